"""``--window``: uint16 to uint8 through a linear window, given or found by ``auto`` in a documented sample."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tifffile
import zarr

import scroll_to_ome as cli
from scrollzarr import progress
from scrollzarr.errors import UsageError
from scrollzarr.window import Window, parse_window

from conftest import assert_ok, assert_one_line_error, read_json, scroll_to_ome, store_files, write_stack
from reference import pyramid

CHUNK = 16


def windowed(values: np.ndarray, low: int, high: int) -> np.ndarray:
    """The README's rule in float64: 255 (v - LOW) / (HIGH - LOW), halves rounded up, clipped to 0 … 255."""
    scaled = (values.astype(np.float64) - low) * 255.0 / (high - low)
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def documented_window(volume: np.ndarray) -> tuple[int, int]:
    """``--window auto`` of the (cropped) volume by the README: the non-zero voxels of up to 32 evenly spaced
    slices (the centre of each of 32 equal parts, rounded down) and, in each, up to 64 rows spaced alike."""

    def spaced(n: int, count: int) -> np.ndarray:
        count = min(count, n)
        return np.floor((np.arange(count) + 0.5) * n / count).astype(int)

    sample = volume[spaced(volume.shape[0], 32)][:, spaced(volume.shape[1], 64)]
    values = sample[sample != 0]
    return math.floor(np.percentile(values, 0.1)), math.ceil(np.percentile(values, 99.9))


def read_volume(directory, count: int) -> np.ndarray:
    return np.stack([tifffile.imread(directory / f"{z:05d}.tif") for z in range(count)])


def found_window(stderr: str) -> tuple[int, int]:
    (match,) = re.findall(r"--window auto: (\d+):(\d+) \(the 0\.1 and 99\.9 percentiles", stderr)
    return int(match[0]), int(match[1])


@pytest.mark.parametrize("low,high", [(0, 1), (0, 65535), (1000, 40000), (3, 5), (7, 517), (65534, 65535)])
def test_every_uint16_value_maps_as_documented(low, high):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.empty(values.shape, np.uint8)
    Window(low, high).apply(values, out)
    np.testing.assert_array_equal(out, windowed(values, low, high))
    flat = out.ravel()
    assert flat[low] == 0 and flat[high] == 255
    assert not flat[:low].any() and (flat[high:] == 255).all()
    assert flat[0] == 0


def test_halves_round_up():
    values = np.array([[1, 3]], np.uint16)  # 255 * 1/2 = 127.5 and 255 * 3/2 clipped
    out = np.empty(values.shape, np.uint8)
    Window(0, 2).apply(values, out)
    assert out.tolist() == [[128, 255]]


@pytest.mark.parametrize(
    "text,message",
    [
        ("abc", "--window must be LOW:HIGH (whole uint16 values, e.g. 1000:40000) or auto, not 'abc'"),
        ("1:2:3", "--window must be LOW:HIGH"),
        ("-5:100", "--window must be LOW:HIGH"),
        ("1.5:100", "--window must be LOW:HIGH"),
        ("10:70000", "--window 10:70000: values are uint16, from 0 to 65535"),
        ("300:200", "--window 300:200: LOW must be below HIGH (LOW maps to 0, HIGH to 255)"),
        ("200:200", "--window 200:200: LOW must be below HIGH"),
    ],
)
def test_bad_window_text(text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_window(text)


def test_window_text():
    assert parse_window("auto") is None
    assert parse_window("100:2000") == (100, 2000)


@pytest.fixture
def sampled_stack(tmp_path, rng):
    """More slices and rows than the sample takes (70 > 32, 150 > 64), a third of the voxels zero."""
    volume = rng.integers(1, 5000, size=(70, 150, 24), dtype=np.uint16)
    volume[rng.random(volume.shape) < 0.3] = 0
    volume[5, 7, 3] = 65000  # off the sampled rows: an outlier the sample does not see
    write_stack(tmp_path / "slices", volume)
    return tmp_path / "slices", volume


def test_auto_window_is_the_documented_sample_and_reproducible(sampled_stack, tmp_path):
    directory, volume = sampled_stack
    first = scroll_to_ome(directory, tmp_path / "a.zarr", "--obytes", 1, "--window", "auto", "--dry_run")
    assert_ok(first)
    expected = documented_window(read_volume(directory, len(volume)))
    assert found_window(first.stderr) == expected
    assert f"window {expected[0]}:{expected[1]} (auto)" in first.stdout
    again = scroll_to_ome(directory, tmp_path / "a.zarr", "--obytes", 1, "--window", "auto", "--dry_run")
    assert found_window(again.stderr) == expected


@pytest.mark.parametrize(
    "layout", [{"compression": "zlib", "tile": (16, 16)}, {"compression": "zlib", "rowsperstrip": 8}]
)
def test_auto_window_of_compressed_slices(tmp_path, rng, layout):
    """Tiled slices are decoded once for all their sampled rows, strips a strip at a time: the same sample."""
    volume = rng.integers(0, 3000, size=(40, 100, 32), dtype=np.uint16)
    write_stack(tmp_path / "slices", volume, **layout)
    result = scroll_to_ome(tmp_path / "slices", tmp_path / "a.zarr", "--obytes", 1, "--window", "auto", "--dry_run")
    assert_ok(result)
    assert found_window(result.stderr) == documented_window(read_volume(tmp_path / "slices", len(volume)))


def test_auto_window_within_the_crop(sampled_stack, tmp_path):
    directory, volume = sampled_stack
    crop = "3:20,10:140,5:60"  # x, y, z
    result = scroll_to_ome(directory, tmp_path / "a.zarr", "--obytes", 1, "--window", "auto", "--ranges", crop)
    assert_ok(result)
    cropped = read_volume(directory, len(volume))[5:60, 10:140, 3:20]
    low, high = documented_window(cropped)
    assert found_window(result.stderr) == (low, high)
    attributes = read_json(tmp_path / "a.zarr" / ".zattrs")["scrollzarr"]
    assert attributes["window"] == [low, high] and attributes["window_source"] == "auto"
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr" / "0"))[...], windowed(cropped, low, high))


def test_auto_window_of_a_stack_without_signal(tmp_path):
    write_stack(tmp_path / "slices", np.zeros((4, 10, 12), np.uint16))
    result = scroll_to_ome(tmp_path / "slices", tmp_path / "a.zarr", "--obytes", 1, "--window", "auto")
    assert_one_line_error(
        result,
        "--window auto found no non-zero voxel in its sample (4 slice(s) x 10 row(s) x 12 column(s))",
        "give the window as --window LOW:HIGH",
        code=1,
    )
    assert not (tmp_path / "a.zarr").exists()


def test_auto_window_of_a_constant_stack_is_one_wide(tmp_path):
    write_stack(tmp_path / "slices", np.full((3, 8, 8), 700, np.uint16))
    result = scroll_to_ome(tmp_path / "slices", tmp_path / "a.zarr", "--obytes", 1, "--window", "auto", "--dry_run")
    assert_ok(result)
    assert found_window(result.stderr) == (700, 701)


@pytest.fixture
def full_range_stack(tmp_path, rng):
    volume = rng.integers(0, 65536, size=(20, 40, 36), dtype=np.uint16)
    volume[0, 0, :4] = [1000, 30000, 999, 30001]  # both edges and one step beyond each
    write_stack(tmp_path / "slices", volume)
    return tmp_path / "slices", volume


def test_given_window_end_to_end(full_range_stack, tmp_path):
    directory, volume = full_range_stack
    out = tmp_path / "out.zarr"
    assert_ok(
        scroll_to_ome(directory, out, "--obytes", 1, "--window", "1000:30000", "--chunk_size", CHUNK, "--nlevels", 2)
    )
    expected = pyramid(windowed(read_volume(directory, len(volume)), 1000, 30000), 2)
    group = zarr.open_group(str(out), mode="r")
    for level, reference in enumerate(expected):
        np.testing.assert_array_equal(group[str(level)][...], reference, err_msg=f"level {level}")
    assert group["0"][0, 0, :4].tolist() == [0, 255, 0, 255]
    attributes = read_json(out / ".zattrs")["scrollzarr"]
    assert attributes["window"] == [1000, 30000] and attributes["window_source"] == "given"


@pytest.mark.parametrize(
    "args,window,source",
    [([], None, None), (["--obytes", "1"], None, "obytes"), (["--preset", "open-data"], None, "obytes")],
)
def test_attributes_without_a_window(full_range_stack, tmp_path, args, window, source):
    directory, volume = full_range_stack
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(directory, out, *args, "--chunk_size", CHUNK, "--nlevels", 1))
    attributes = read_json(out / ".zattrs")["scrollzarr"]
    assert attributes["window"] == window and attributes["window_source"] == source
    stored = zarr.open_array(str(out / "0"))[...]
    original = read_volume(directory, len(volume))
    np.testing.assert_array_equal(stored, original if source is None else (original // 256).astype(np.uint8))


def test_window_needs_uint16_slices(tmp_path, rng):
    write_stack(tmp_path / "slices", rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8))
    result = scroll_to_ome(tmp_path / "slices", tmp_path / "a.zarr", "--obytes", 1, "--window", "auto")
    assert_one_line_error(
        result, "--window maps uint16 values to uint8, but the slices are uint8; leave it out", code=2
    )


def stopped_before_the_end(monkeypatch, capsys, directory, out, *args: str) -> None:
    """``out`` as a run leaves it when stopped after its last chunk, before its progress record is removed."""

    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(progress, "remove", stop)
    assert cli.main([str(directory), str(out), *args, "--quiet"]) == 130
    capsys.readouterr()
    monkeypatch.undo()
    assert (out / progress.KEY).exists()


def test_resume_checks_the_window(full_range_stack, tmp_path, monkeypatch, capsys):
    directory, _ = full_range_stack
    args = ["--obytes", "1", "--chunk_size", str(CHUNK), "--nlevels", "2"]
    reference = tmp_path / "reference" / "out.zarr"
    assert_ok(scroll_to_ome(directory, reference, *args, "--window", "auto"))
    out = tmp_path / "out.zarr"
    stopped_before_the_end(monkeypatch, capsys, directory, out, *args, "--window", "auto")
    low, high = read_json(out / progress.KEY)["fingerprint"]["window"]
    before = store_files(out)
    result = scroll_to_ome(directory, out, *args, "--window", f"{low}:{high + 1}", "--resume")
    assert_one_line_error(result, f"--window was [{low}, {high}] in the stopped run, now [{low}, {high + 1}]", code=2)
    result = scroll_to_ome(directory, out, *args, "--resume")
    assert_one_line_error(result, f"--window was [{low}, {high}] in the stopped run, now None", code=2)
    assert store_files(out) == before
    assert_ok(scroll_to_ome(directory, out, *args, "--window", "auto", "--resume"))
    assert store_files(out) == store_files(reference)


@pytest.mark.parametrize(
    "change,message",
    [
        (["--compressor", "zstd"], "--compressor was 'none' in the stopped run, now 'zstd'"),
        (["--zarr_format", "3"], "--zarr_format was 2 in the stopped run, now 3"),
    ],
)
def test_resume_checks_the_layout(full_range_stack, tmp_path, monkeypatch, capsys, change, message):
    directory, _ = full_range_stack
    args = ["--chunk_size", str(CHUNK), "--nlevels", "2"]
    out = tmp_path / "out.zarr"
    stopped_before_the_end(monkeypatch, capsys, directory, out, *args)
    result = scroll_to_ome(directory, out, *args, *change, "--resume")
    assert_one_line_error(result, message, "resume with the options of the stopped run", code=2)
