"""End-to-end: real TIFF stacks converted by the real script, read back with zarr and compared
with the numpy references of tests/reference.py."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v04.image import Image

from conftest import ROOT, assert_ok, assert_one_line_error, chunk_files, read_json, scroll_to_ome, write_stack
from reference import pyramid

CHUNK = 16
NLEVELS = 4


def make_volume(rng: np.random.Generator, shape=(37, 45, 51)) -> np.ndarray:
    """Full-range noise, a band of tiny values (many exact .5 means) and an all-zero corner."""
    volume = rng.integers(1, 65535, size=shape, dtype=np.uint16)
    volume[:, :, :20] = rng.integers(0, 10, size=(shape[0], shape[1], 20), dtype=np.uint16)
    volume[:32, :32, :] = 0
    return volume


@pytest.fixture
def volume(rng):
    return make_volume(rng)


@pytest.fixture
def stack(tmp_path, volume):
    directory = tmp_path / "slices"
    write_stack(directory, volume)
    return directory


def expected_chunk_keys(level: np.ndarray, chunk: int) -> set[tuple[int, ...]]:
    """Indices of the chunks of ``level`` that hold a non-zero voxel."""
    keys = set()
    counts = [range(-(-n // chunk)) for n in level.shape]
    for index in itertools.product(*counts):
        block = level[tuple(slice(i * chunk, (i + 1) * chunk) for i in index)]
        if block.any():
            keys.add(index)
    return keys


def check_level_files(array_dir: Path, level: np.ndarray, chunk: int) -> None:
    """``.zarray`` as viewers need it, one file per non-zero chunk at z/y/x, none all zero."""
    meta = read_json(array_dir / ".zarray")
    assert meta["zarr_format"] == 2
    assert meta["shape"] == list(level.shape)
    assert meta["chunks"] == [chunk] * 3
    assert meta["dtype"] == level.dtype.str
    assert meta["compressor"] is None
    assert meta["filters"] is None
    assert meta["fill_value"] == 0
    assert meta["order"] == "C"
    assert meta["dimension_separator"] == "/"
    files = chunk_files(array_dir)
    keys = {tuple(int(part) for part in f.relative_to(array_dir).parts) for f in files}
    assert keys == expected_chunk_keys(level, chunk)
    for f in files:
        raw = np.frombuffer(f.read_bytes(), level.dtype)
        assert raw.size == chunk**3  # uncompressed, padded to the full chunk
        assert raw.any(), f"all-zero chunk file {f}"


def check_ome_store(store: Path, levels: list[np.ndarray], chunk: int, translation=None) -> None:
    assert read_json(store / ".zgroup") == {"zarr_format": 2}
    group = zarr.open_group(str(store), mode="r")
    Image.from_zarr(group)  # independent NGFF 0.4 validation; raises on bad metadata
    (multiscale,) = read_json(store / ".zattrs")["multiscales"]
    assert multiscale["version"] == "0.4"
    assert [(a["name"], a["type"]) for a in multiscale["axes"]] == [("z", "space"), ("y", "space"), ("x", "space")]
    assert [d["path"] for d in multiscale["datasets"]] == [str(i) for i in range(len(levels))]
    for index, (dataset, expected) in enumerate(zip(multiscale["datasets"], levels, strict=True)):
        transforms = dataset["coordinateTransformations"]
        assert transforms[0] == {"type": "scale", "scale": [2.0**index] * 3}
        if translation is None:
            assert len(transforms) == 1
        else:
            assert transforms[1] == {"type": "translation", "translation": [float(v) for v in translation]}
        np.testing.assert_array_equal(group[str(index)][...], expected, err_msg=f"level {index}")
        check_level_files(store / str(index), expected, chunk)
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == sorted(str(i) for i in range(len(levels)))


@pytest.mark.parametrize("algorithm", ["mean", "gaussian", "nearest", "max"])
def test_every_algorithm_matches_reference(tmp_path, stack, volume, algorithm):
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", NLEVELS, "--algorithm", algorithm)
    assert_ok(result)
    check_ome_store(out, pyramid(volume, NLEVELS, algorithm), CHUNK)
    assert read_json(out / ".zattrs")["multiscales"][0]["type"] == algorithm


def test_defaults_give_six_levels_of_128_chunks(tmp_path, rng):
    volume = make_volume(rng, (70, 140, 133))
    write_stack(tmp_path / "slices", volume)
    assert_ok(scroll_to_ome(tmp_path / "slices", tmp_path / "out.zarr"))
    check_ome_store(tmp_path / "out.zarr", pyramid(volume, 6), 128)


def test_odd_chunk_size_and_single_slice_levels(tmp_path, rng):
    volume = make_volume(rng, (9, 45, 51))
    write_stack(tmp_path / "slices", volume)
    assert_ok(scroll_to_ome(tmp_path / "slices", tmp_path / "out.zarr", "--chunk-size", 7, "--nlevels", 5))
    check_ome_store(tmp_path / "out.zarr", pyramid(volume, 5), 7)


def test_compressed_and_tiff_extension_input(tmp_path, volume):
    directory = tmp_path / "masked"
    paths = write_stack(directory, volume, compression="zlib", rowsperstrip=8)
    for path in paths[::2]:
        path.rename(path.with_suffix(".tiff"))
    assert_ok(scroll_to_ome(directory, tmp_path / "out.zarr", "--chunk_size", CHUNK, "--nlevels", NLEVELS))
    check_ome_store(tmp_path / "out.zarr", pyramid(volume, NLEVELS), CHUNK)


def test_z_index_is_the_slice_number_and_gaps_are_zero(tmp_path, rng):
    volume = rng.integers(1, 65535, size=(6, 20, 24), dtype=np.uint16)
    paths = write_stack(tmp_path / "slices", volume, first=1000)
    paths[2].unlink()  # slice 1002
    paths[3].unlink()  # slice 1003
    (tmp_path / "slices" / "notes.txt").write_text("ignored")
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(tmp_path / "slices", out, "--chunk_size", CHUNK, "--nlevels", 2)
    assert_ok(result)
    assert "no file for slice(s) 1002-1003; they are written as zeros" in result.stderr
    full = np.zeros((1006, 20, 24), np.uint16)
    full[1000:] = volume
    full[1002:1004] = 0
    check_ome_store(out, pyramid(full, 2), CHUNK)
    assert read_json(out / ".zattrs")["scrollzarr"]["missing_slices"] == [1002, 1003]


@pytest.mark.parametrize(
    ("ranges", "crop"),
    [
        ("3:40,,", (slice(None), slice(None), slice(3, 40))),
        (",5:30,", (slice(None), slice(5, 30), slice(None))),
        (",,4:33", (slice(4, 33), slice(None), slice(None))),
        ("11:,:38,7:1000", (slice(7, None), slice(None, 38), slice(11, None))),
        ("-20:,,", (slice(None), slice(None), slice(-20, None))),
    ],
)
def test_ranges_crop_and_translate(tmp_path, stack, volume, ranges, crop):
    out = tmp_path / "crop.zarr"
    # "=" keeps a range that starts with "-" from being read as an option
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 3, f"--ranges={ranges}"))
    origin = [s.indices(n)[0] for s, n in zip(crop, volume.shape, strict=True)]
    check_ome_store(out, pyramid(volume[crop], 3), CHUNK, translation=origin)
    assert read_json(out / ".zattrs")["scrollzarr"]["origin_zyx"] == origin


def test_zarr_only_writes_one_plain_array(tmp_path, stack, volume):
    out = tmp_path / "plain.zarr"
    assert_ok(scroll_to_ome(stack, out, "--zarr_only", "--chunk_size", CHUNK))
    assert not (out / ".zgroup").exists()
    array = zarr.open_array(str(out), mode="r")
    np.testing.assert_array_equal(array[...], volume)
    check_level_files(out, volume, CHUNK)


def test_obytes_1_stores_uint8(tmp_path, stack, volume):
    out = tmp_path / "u8.zarr"
    assert_ok(scroll_to_ome(stack, out, "--obytes", 1, "--chunk_size", CHUNK, "--nlevels", NLEVELS))
    check_ome_store(out, pyramid((volume // 256).astype(np.uint8), NLEVELS), CHUNK)


def default_need(directory: Path, out: Path, *args: object) -> int:
    """The bytes a run without --max_gb plans for, from its dry run (exactly, with --verbose)."""
    plan = scroll_to_ome(directory, out, *args, "--dry_run", "--verbose")
    assert_ok(plan)
    return int(re.search(r"memory: (\d+) bytes", plan.stderr).group(1))


# ru_maxrss would count the forking test process's memory too (Linux keeps it across exec); VmHWM does not
MEASURED_RUN = """
import sys
import scroll_to_ome
code = scroll_to_ome.main(sys.argv[1:])
counters = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(counters["rchar"], int(status["VmHWM"].split()[0]) * 1024)
sys.exit(code)
"""


def measured_run(*args: object) -> tuple[int, int]:
    """Run scroll_to_ome in a fresh process: bytes it read through read calls (page cache included)
    and its peak resident memory in bytes, both from /proc."""
    completed = subprocess.run(
        [sys.executable, "-c", MEASURED_RUN, *map(str, args), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert_ok(completed)
    read, peak = map(int, completed.stdout.split()[-2:])
    return read, peak


def bytes_read(*args: object) -> int:
    return measured_run(*args)[0]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
@pytest.mark.parametrize("extra", [(), ("--max_gb", "0.006")])
def test_every_input_byte_is_read_once(tmp_path, rng, extra):
    """A run reads the pixel data once: read bytes minus those of a dry run (imports, headers) = the pixels."""
    volume = rng.integers(1, 65535, size=(64, 256, 256), dtype=np.uint16)  # 2 slabs of 8 stripes each
    write_stack(tmp_path / "slices", volume)
    args = (tmp_path / "slices", tmp_path / "out.zarr", "--chunk_size", 32, "--nlevels", 2, "--workers", 2, *extra)
    plan = scroll_to_ome(*args, "--dry_run")
    assert "levels 0 to 1 built in one pass over the TIFFs" in plan.stdout  # nothing read back
    if extra:
        assert "level 0 read in bands of 128 x 256" in plan.stdout
    overhead = bytes_read(*args, "--dry_run")
    pixels = volume.nbytes
    read = bytes_read(*args) - overhead
    assert pixels <= read <= pixels * 1.02, (read, pixels)
    check_level_files(tmp_path / "out.zarr" / "0", volume, 32)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
def test_max_gb_bounds_the_peak_memory_of_the_run(tmp_path, rng):
    """At 1/8 of the default need, peak resident memory <= the bound + 0.5 GiB, which the default run exceeds."""
    tile = rng.integers(1, 65535, size=(96, 256, 256), dtype=np.uint16)
    volume = np.tile(tile, (1, 8, 8))  # 96 slices of 2048 x 2048: 768 MiB
    write_stack(tmp_path / "slices", volume)
    del tile, volume
    args = ["--chunk_size", 96, "--nlevels", 3, "--workers", 2]  # the bound does not depend on the cores
    bound = default_need(tmp_path / "slices", tmp_path / "o.zarr", *args) / 8
    _, default_peak = measured_run(tmp_path / "slices", tmp_path / "default.zarr", *args)
    _, peak = measured_run(tmp_path / "slices", tmp_path / "bounded.zarr", *args, "--max_gb", bound / 2**30)
    assert peak <= bound + 2**29 < default_peak, (peak, bound, default_peak)
    for level in range(3):  # the same chunks as the default run, itself checked against numpy in the tests above
        bounded, default = (chunk_files(tmp_path / name / str(level)) for name in ("bounded.zarr", "default.zarr"))
        assert [p.relative_to(tmp_path / "bounded.zarr") for p in bounded] == [
            p.relative_to(tmp_path / "default.zarr") for p in default
        ]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(bounded, default, strict=True))


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize(
    ("shape", "fraction", "passes"),
    [
        # bands of whole rows, streamed through level 1; levels 2 and 3 read back
        ((20, 150, 170), 1 / 2, "levels 0 to 1 built in one pass over the TIFFs; levels 2 to 3 from the stored"),
        # bands of whole rows, every lower level read back
        ((20, 150, 170), 1 / 16, "level 0 built in one pass over the TIFFs; levels 1 to 3 from the stored"),
        # one chunk row is too much: the band is cut along x too
        ((20, 40, 2000), 1 / 32, "level 0 built in one pass over the TIFFs; levels 1 to 3 from the stored"),
    ],
)
def test_max_gb_cuts_level0_into_bands(tmp_path, rng, shape, compression, fraction, passes):
    volume = make_volume(rng, shape)
    directory = tmp_path / "slices"
    write_stack(directory, volume, compression=compression)
    out = tmp_path / "out.zarr"
    args = ["--chunk_size", CHUNK, "--nlevels", NLEVELS, "--workers", 1]
    budget = default_need(directory, out, *args) * fraction
    args += ["--max_gb", budget / 2**30]
    plan = scroll_to_ome(directory, out, *args, "--dry_run", "--verbose")
    assert_ok(plan)
    rows, cols = map(int, re.search(r"level 0 read in bands of (\d+) x (\d+)", plan.stdout).groups())
    assert rows * cols < shape[1] * shape[2]
    assert (rows % CHUNK == 0 and cols % CHUNK == 0) or cols == shape[2]
    assert passes in plan.stdout
    assert int(re.search(r"memory: (\d+) bytes", plan.stderr).group(1)) <= budget
    assert_ok(scroll_to_ome(directory, out, *args))
    check_ome_store(out, pyramid(volume, NLEVELS), CHUNK)


def test_max_gb_too_small_is_refused_before_writing(tmp_path, stack):
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--max_gb", 0.00001)
    assert_one_line_error(result, "--max_gb 1e-05 is too small for chunks of 16", "raise --max_gb", code=2)
    assert not out.exists()


def test_max_gb_that_fits_bands_but_not_the_read_back_names_what_is_enough(tmp_path, stack, volume):
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--max_gb", 0.0001)
    assert_one_line_error(result, "--max_gb 0.0001 is too small for chunks of 16", "raise --max_gb", code=2)
    assert not out.exists()
    enough = re.search(r"at least ([0-9.e-]+) GB", result.stderr).group(1)
    assert float(enough) > 0.0001
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--max_gb", enough))
    check_ome_store(out, pyramid(volume, 6), CHUNK)


def test_first_new_level_rebuilds_from_the_level_above(tmp_path, stack, volume):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 5))
    missing_input = tmp_path / "gone"
    result = scroll_to_ome(missing_input, out, "--first_new_level", 2, "--nlevels", 4, "--algorithm", "max")
    assert_ok(result)
    mean_levels = pyramid(volume, 2)
    levels = mean_levels + pyramid(mean_levels[1], 3, "max")[1:]
    check_ome_store(out, levels, CHUNK)  # level 4 of the first run is gone, metadata lists 0-3
    assert read_json(out / ".zattrs")["multiscales"][0]["type"] == "max"


def test_first_new_level_with_another_chunk_size(tmp_path, stack, volume):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 2))
    assert_ok(scroll_to_ome(stack, out, "--first_new_level", 1, "--nlevels", 4, "--chunk_size", 8))
    levels = pyramid(volume, 4)
    check_level_files(out / "0", levels[0], CHUNK)
    for level in (1, 2, 3):
        check_level_files(out / str(level), levels[level], 8)
        np.testing.assert_array_equal(zarr.open_array(str(out / str(level)), mode="r")[...], levels[level])


def test_first_new_level_keeps_the_translation(tmp_path, stack, volume):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 1, "--ranges", "2:,3:,4:"))
    assert_ok(scroll_to_ome(stack, out, "--first-new-level", 1, "--nlevels", 3))
    check_ome_store(out, pyramid(volume[4:, 3:, 2:], 3), CHUNK, translation=(4, 3, 2))


def test_overwrite_replaces_a_store(tmp_path, stack, volume, rng):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 5))
    other = make_volume(rng, (20, 30, 30))
    write_stack(tmp_path / "other", other)
    assert_ok(scroll_to_ome(tmp_path / "other", out, "--chunk_size", CHUNK, "--nlevels", 2, "--overwrite"))
    check_ome_store(out, pyramid(other, 2), CHUNK)  # no stale level or chunk of the first store


def test_overwrite_replaces_an_empty_directory(tmp_path, stack, volume):
    out = tmp_path / "out.zarr"
    out.mkdir()
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 2, "--overwrite"))
    check_ome_store(out, pyramid(volume, 2), CHUNK)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, stack):
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(stack, out, "--dry_run", "--chunk_size", CHUNK, "--nlevels", 3)
    assert_ok(result)
    assert not out.exists()
    text = result.stdout
    assert "37 slice files, numbers 0 to 36, each 45 x 51 (rows x columns) uint16" in text
    assert "missing slices (written as zeros): none" in text
    assert "level 0: 37 x 45 x 51 (z, y, x), 36 chunks" in text  # 3 x 3 x 4
    assert "level 1: 19 x 23 x 26 (z, y, x), 8 chunks" in text
    assert "level 2: 10 x 12 x 13 (z, y, x), 1 chunks" in text
    assert "45 chunks, at most 360 KiB (all-zero chunks are not written)" in text  # 45 x 16^3 x 2 bytes
    assert "level 0 read in bands of 45 x 51 (rows x columns)" in text
    assert "levels 0 to 2 built in one pass over the TIFFs" in text


def test_dry_run_of_first_new_level(tmp_path, stack):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 2))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = scroll_to_ome(stack, out, "--first_new_level", 2, "--nlevels", 4, "--dry-run")
    assert_ok(result)
    assert "rebuild levels 2 to 3" in result.stdout
    assert "level 3: 5 x 6 x 7 (z, y, x), 1 chunks of 16^3, mean" in result.stdout
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_progress_summary_quiet_and_verbose(tmp_path, stack):
    normal = scroll_to_ome(stack, tmp_path / "a.zarr", "--chunk_size", CHUNK, "--nlevels", 2)
    assert_ok(normal)
    assert "\r" not in normal.stderr  # the progress bar is for terminals: tested in test_cli_hostile.py
    assert "wrote " in normal.stderr and "all-zero chunks skipped" in normal.stderr
    quiet = scroll_to_ome(stack, tmp_path / "b.zarr", "--chunk_size", CHUNK, "--nlevels", 2, "--quiet")
    assert_ok(quiet)
    assert quiet.stderr == ""
    verbose = scroll_to_ome(stack, tmp_path / "c.zarr", "--chunk_size", CHUNK, "--nlevels", 2, "--verbose")
    assert_ok(verbose)
    assert "bands of" in verbose.stderr


def test_help_describes_every_option_with_its_default():
    result = scroll_to_ome("--help")
    assert_ok(result)
    text = " ".join(result.stdout.split())
    for option in [
        "--chunk_size", "--chunk-size", "--nlevels", "--max_gb", "--zarr_only", "--overwrite", "--algorithm",
        "--ranges", "--first_new_level", "--obytes", "--dry_run", "--quiet", "--verbose",
    ]:  # fmt: skip
        assert option in text, option
    assert "(default: 6)" in text and "(default: mean)" in text and "(default: 0)" in text
    assert "sigma 0.667" in text


@pytest.mark.parametrize("workers", [["--workers", "1"], ["--num_threads", "3"], ["--num-threads", "2"]])
def test_workers_give_the_same_store(tmp_path, stack, volume, workers):
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", NLEVELS, *workers, "--dry_run")
    assert f"{workers[1]} worker(s)" in result.stdout
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", NLEVELS, *workers))
    check_ome_store(out, pyramid(volume, NLEVELS), CHUNK)


@pytest.mark.parametrize("algorithm", ["gaussian", "max", "nearest"])
def test_levels_read_back_under_max_gb_match_for_every_algorithm(tmp_path, rng, algorithm):
    volume = make_volume(rng, (20, 150, 170))
    write_stack(tmp_path / "slices", volume)
    out = tmp_path / "out.zarr"
    args = ["--chunk_size", CHUNK, "--nlevels", NLEVELS, "--workers", 1, "--algorithm", algorithm]
    budget = default_need(tmp_path / "slices", out, *args) / 8
    plan = scroll_to_ome(tmp_path / "slices", out, *args, "--max_gb", budget / 2**30, "--dry_run")
    assert "from the stored level above each" in plan.stdout
    assert_ok(scroll_to_ome(tmp_path / "slices", out, *args, "--max_gb", budget / 2**30))
    check_ome_store(out, pyramid(volume, NLEVELS, algorithm), CHUNK)
