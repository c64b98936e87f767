"""decompress_tiffs on real compressed TIFFs: same pixels, uncompressed, memory-mappable, resumable, nothing lost."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import ROOT, assert_ok, assert_one_line_error, run_script


def decompress_tiffs(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("decompress_tiffs.py", *args)


def image(rng: np.random.Generator, shape=(96, 128), dtype=np.uint16) -> np.ndarray:
    """Scroll-like: noise inside, zeros outside (as in masked_volumes)."""
    data = rng.integers(1, np.iinfo(dtype).max, size=shape, dtype=dtype)
    data[: shape[0] // 3] = 0
    return data


@pytest.fixture
def masked(tmp_path, rng) -> tuple[Path, dict[str, np.ndarray]]:
    """zlib, LZW (with predictor), zstd, tiled deflate, uncompressed, and an ImageJ file with resolution."""
    directory = tmp_path / "masked"
    directory.mkdir()
    written = {}
    kinds = [
        {"compression": "zlib"},
        {"compression": "lzw", "predictor": True},
        {"compression": "zstd"},
        {"compression": "zlib", "tile": (32, 32)},
        {},
        {"compression": "lzw"},
    ]
    for z, kind in enumerate(kinds):
        data = image(rng)
        tifffile.imwrite(directory / f"{z:05d}.tif", data, **kind)
        written[f"{z:05d}.tif"] = data
    data = image(rng, dtype=np.uint8)
    tifffile.imwrite(
        directory / "00006.tif",
        data,
        imagej=True,
        compression="zlib",
        resolution=(1 / 7.91, 1 / 7.91),
        metadata={"unit": "um", "Ranges": (0.0, 255.0)},
        extratags=[(315, "s", 0, "Vesuvius Challenge", True)],
    )
    written["00006.tif"] = data
    return directory, written


def assert_decompressed(directory: Path, written: dict[str, np.ndarray]) -> None:
    for name, data in written.items():
        with tifffile.TiffFile(directory / name) as tiff:
            page = tiff.pages.first
            assert page.compression == 1 and not page.is_tiled and page.is_contiguous, name
        mapped = tifffile.memmap(directory / name)
        assert isinstance(mapped, np.memmap) and mapped.dtype == data.dtype
        np.testing.assert_array_equal(mapped, data)


def test_pixels_equal_uncompressed_memory_mappable_tags_kept(masked, tmp_path):
    source, written = masked
    result = decompress_tiffs(source, tmp_path / "out", "--verify")
    assert_ok(result)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)
    assert_decompressed(tmp_path / "out", written)
    # The uncompressed input is copied byte for byte.
    assert (tmp_path / "out" / "00004.tif").read_bytes() == (source / "00004.tif").read_bytes()
    with tifffile.TiffFile(tmp_path / "out" / "00006.tif") as tiff:
        page = tiff.pages.first
        assert tiff.is_imagej and tiff.imagej_metadata["unit"] == "um"
        assert tiff.imagej_metadata["Ranges"] == (0.0, 255.0)
        assert (
            page.tags["XResolution"].value
            == tifffile.TiffFile(source / "00006.tif").pages.first.tags["XResolution"].value
        )
        assert page.tags["Artist"].value == "Vesuvius Challenge"
    assert "6 files decompressed, 1 already uncompressed copied" in result.stderr
    assert "verified 7 files" in result.stderr
    assert "MB/s" in result.stderr  # the bar, shown on a terminal only, is tested in test_cli_hostile.py


def test_tiff_and_upper_case_names_in_slice_order(tmp_path, rng):
    source = tmp_path / "in"
    source.mkdir()
    for name in ("10.TIF", "9.tiff"):
        tifffile.imwrite(source / name, image(rng), compression="zlib")
    (source / "notes.txt").write_text("not a tiff")
    result = decompress_tiffs(source, tmp_path / "out", "--workers", 1, "--verbose")
    assert_ok(result)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["10.TIF", "9.tiff"]


def test_a_corrupt_file_is_reported_and_the_others_are_converted(masked, tmp_path):
    source, written = masked
    whole = (source / "00002.tif").read_bytes()
    (source / "00002.tif").write_bytes(whole[: len(whole) // 2])  # truncated
    (source / "00003.tif").write_bytes(b"II*\x00garbage")
    result = decompress_tiffs(source, tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "00002.tif: truncated" in result.stderr
    assert "00003.tif: cannot read" in result.stderr
    assert "error: 2 of 7 files failed (00002.tif, 00003.tif" in result.stderr
    for name in ("00002.tif", "00003.tif"):
        del written[name]
        assert not (tmp_path / "out" / name).exists()
    assert_decompressed(tmp_path / "out", written)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def big_stack(directory: Path, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    directory.mkdir()
    written = {}
    data = image(rng, shape=(1024, 1024))
    for z in range(count):
        tifffile.imwrite(directory / f"{z:05d}.tif", data + z, compression="zlib")
        written[f"{z:05d}.tif"] = data + z
    return written


def started(args: list[object]) -> subprocess.Popen[str]:
    command = [sys.executable, str(ROOT / "decompress_tiffs.py"), *map(str, args)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def wait_for_files(directory: Path, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if directory.exists() and len([p for p in directory.iterdir() if not p.name.startswith(".")]) >= count:
            return
        time.sleep(0.01)
    raise AssertionError("the run finished, or wrote nothing, before it could be stopped")


def test_killed_run_resumes_skipping_finished_files(tmp_path, rng):
    written = big_stack(tmp_path / "in", 40, rng)
    out = tmp_path / "out"
    process = started([tmp_path / "in", out, "--workers", 1])
    wait_for_files(out, 3, process)
    process.kill()
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    assert 3 <= len(finished) < 40
    for name in finished:  # every file under a final name is complete
        np.testing.assert_array_equal(tifffile.imread(out / name), written[name])
    result = decompress_tiffs(tmp_path / "in", out)
    assert_ok(result)
    assert f"{40 - len(finished)} files decompressed" in result.stderr
    assert f"{len(finished)} finished earlier skipped" in result.stderr
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    assert_decompressed(out, written)
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temporary file left


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_stops_cleanly_and_says_how_to_continue(tmp_path, rng, sig, code):
    written = big_stack(tmp_path / "in", 40, rng)
    out = tmp_path / "out"
    process = started([tmp_path / "in", out, "--workers", 2])
    wait_for_files(out, 2, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("decompress_tiffs: interrupted; to continue: ")
    assert last.endswith(" (finished files are skipped)")
    command = shlex.split(last.split("to continue: ", 1)[1].removesuffix(" (finished files are skipped)"))
    assert command[:2] == [sys.executable, str(ROOT / "decompress_tiffs.py")]
    names = [p.name for p in out.iterdir()]
    assert not [n for n in names if n.startswith(".")] and len(names) < 40
    for name in names:
        np.testing.assert_array_equal(tifffile.imread(out / name), written[name])
    resumed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert_ok(resumed)
    assert f"{len(names)} finished earlier skipped" in resumed.stderr
    assert_decompressed(out, written)


def test_overwrite_rewrites_and_the_input_is_never_the_output(masked, tmp_path):
    source, written = masked
    out = tmp_path / "out"
    assert_ok(decompress_tiffs(source, out, "--quiet"))
    (out / "mine.txt").write_text("keep")
    before = (out / "00000.tif").stat().st_ino
    result = decompress_tiffs(source, out, "--overwrite")
    assert_ok(result)
    assert "6 files decompressed, 1 already uncompressed copied, 0 finished earlier skipped" in result.stderr
    assert (out / "00000.tif").stat().st_ino != before and (out / "mine.txt").read_text() == "keep"
    assert_decompressed(out, written)
    snapshot = {p.name: p.read_bytes() for p in source.iterdir()}
    for target in (source, tmp_path, source / ".."):
        result = decompress_tiffs(source, target, "--overwrite")
        assert_one_line_error(result, "input directory", "choose another one", code=1)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == snapshot


def test_an_existing_file_that_is_not_a_finished_copy_is_not_replaced_without_overwrite(masked, tmp_path):
    source, written = masked
    out = tmp_path / "out"
    out.mkdir()
    (out / "00001.tif").write_text("somebody's notes")
    tifffile.imwrite(out / "00002.tif", np.zeros((5, 5), np.uint16))
    result = decompress_tiffs(source, out)
    assert_one_line_error(result, "2 of 7 files failed (00001.tif, 00002.tif", code=1)
    assert "00001.tif exists but is not a readable TIFF; add --overwrite" in result.stderr
    assert "00002.tif exists but holds 1 image(s) of another shape or type" in result.stderr
    assert (out / "00001.tif").read_text() == "somebody's notes"
    assert_ok(decompress_tiffs(source, out, "--overwrite", "--quiet"))
    assert_decompressed(out, written)


def test_verify_finds_an_output_that_differs(masked, tmp_path):
    source, _written = masked
    out = tmp_path / "out"
    assert_ok(decompress_tiffs(source, out, "--quiet"))
    with tifffile.TiffFile(out / "00001.tif") as tiff:
        offset = tiff.pages.first.dataoffsets[0]
    with open(out / "00001.tif", "r+b") as handle:  # damage pixels, keep the header valid
        handle.seek(offset + 2 * 128 * 50)
        handle.write(b"\x01\x02\x03\x04")
    assert_ok(decompress_tiffs(source, out, "--quiet"))  # without --verify: headers match, skipped
    result = decompress_tiffs(source, out, "--verify")
    assert_one_line_error(result, "1 of 7 files failed (00001.tif", code=1)
    assert "00001.tif: verification failed: the pixels of its output differ from it" in result.stderr


def test_removes_the_temporary_files_of_a_killed_run(masked, tmp_path):
    source, written = masked
    out = tmp_path / "out"
    out.mkdir()
    (out / ".00003.tif.partial").write_bytes(b"half a file")
    (out / ".other.partial").write_bytes(b"not ours")
    result = decompress_tiffs(source, out)
    assert_ok(result)
    assert "removed 1 temporary file(s) of an interrupted run" in result.stderr
    assert not (out / ".00003.tif.partial").exists() and (out / ".other.partial").exists()
    assert_decompressed(out, written)


def test_directory_and_option_errors(tmp_path, masked):
    source, _ = masked
    result = decompress_tiffs(tmp_path / "none", tmp_path / "out")
    assert_one_line_error(result, "input directory", "none does not exist", code=1)
    result = decompress_tiffs(source / "00000.tif", tmp_path / "out")
    assert_one_line_error(result, "00000.tif is not a directory", code=1)
    (tmp_path / "empty").mkdir()
    assert_one_line_error(decompress_tiffs(tmp_path / "empty", tmp_path / "out"), "no .tif or .tiff files", code=1)
    (tmp_path / "file").write_text("x")
    assert_one_line_error(decompress_tiffs(source, tmp_path / "file"), "is a file", code=1)
    assert_one_line_error(decompress_tiffs(source, tmp_path / "out", "--workers", 0), "at least 1, not 0", code=2)
    assert_one_line_error(decompress_tiffs(source, tmp_path / "out", "--workers", "x"), "invalid int", code=2)
    assert not (tmp_path / "out").exists()


def test_quiet_prints_nothing_on_success(masked, tmp_path):
    source, written = masked
    result = decompress_tiffs(source, tmp_path / "out", "--quiet", "--num_threads", 1)
    assert_ok(result)
    assert result.stderr == ""
    assert_decompressed(tmp_path / "out", written)


def test_a_full_disk_stops_with_one_message_and_leaves_no_partial_file(masked, small_tmpfs):
    source, _ = masked
    big = source.parent / "big"
    big.mkdir()
    data = np.random.default_rng(3).integers(0, 65535, size=(1024, 1024), dtype=np.uint16)
    for z in range(3):
        tifffile.imwrite(big / f"{z:05d}.tif", data, compression="zlib")  # 2 MiB each, 6 MiB out: more than 3 MiB
    result = decompress_tiffs(big, small_tmpfs / "out", "--workers", 1)
    assert_one_line_error(result, "no space left on the device", code=1)
    names = [p.name for p in (small_tmpfs / "out").iterdir()]
    assert not [n for n in names if n.startswith(".")]
    for name in names:
        np.testing.assert_array_equal(tifffile.imread(small_tmpfs / "out" / name), data)
    os.sync()
