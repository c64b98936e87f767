"""decompress_tiffs loses nothing and says nothing false: unreadable names, a held output, durability, order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scrollzarr import decompress

from conftest import ROOT, assert_ok, assert_one_line_error, run_script


def decompress_tiffs(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("decompress_tiffs.py", *args)


def write_inputs(directory: Path, names: list[str], rng: np.random.Generator, **imwrite) -> dict[str, np.ndarray]:
    """zlib-compressed uint16 images under ``names``; the pixels written, by name."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        data = rng.integers(0, 65535, size=(48, 64), dtype=np.uint16)
        tifffile.imwrite(directory / name, data, **({"compression": "zlib"} | imwrite))
        written[name] = data
    return written


def assert_same_pixels(directory: Path, written: dict[str, np.ndarray]) -> None:
    for name, data in written.items():
        with tifffile.TiffFile(directory / name) as tiff:
            assert tiff.pages.first.compression == 1, name
        np.testing.assert_array_equal(tifffile.imread(directory / name), data)


def test_a_dangling_symlink_among_the_inputs_is_a_failed_file(tmp_path, rng):
    source = tmp_path / "in"
    written = write_inputs(source, ["00000.tif", "00002.tif"], rng)
    (source / "00001.tif").symlink_to(tmp_path / "gone" / "00001.tif")
    out = tmp_path / "out"
    result = decompress_tiffs(source, out, "--workers", 1)
    assert_one_line_error(result, "1 of 3 files failed (00001.tif", code=1)
    assert "00001.tif: cannot read: it is a symbolic link to" in result.stderr
    assert "which does not exist" in result.stderr
    assert_same_pixels(out, written)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tif", "00002.tif"]


def test_an_output_name_that_is_a_directory_fails_that_file_only(tmp_path, rng):
    source = tmp_path / "in"
    written = write_inputs(source, [f"{z:05d}.tif" for z in range(5)], rng)
    out = tmp_path / "out"
    (out / "00003.tif").mkdir(parents=True)
    (out / "00003.tif" / "mine.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        result = decompress_tiffs(source, out, "--workers", 1, *extra)
        assert_one_line_error(result, "1 of 5 files failed (00003.tif", code=1)
        assert "00003.tif is a directory; move or rename it" in result.stderr
        assert (out / "00003.tif" / "mine.txt").read_text() == "keep"
        del written["00003.tif"]
        assert_same_pixels(out, written)
        written["00003.tif"] = tifffile.imread(source / "00003.tif")


def started(*args: object) -> subprocess.Popen[str]:
    command = [sys.executable, str(ROOT / "decompress_tiffs.py"), *map(str, args)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_second_run_on_the_same_output_is_refused(tmp_path, rng):
    source = tmp_path / "in"
    source.mkdir()
    data = rng.integers(0, 65535, size=(1024, 1024), dtype=np.uint16)
    for z in range(30):
        tifffile.imwrite(source / f"{z:05d}.tif", data + z, compression="zlib")
    out = tmp_path / "out"
    first = started(source, out, "--workers", 1)
    deadline = time.monotonic() + 120
    while not [p for p in out.glob("*.tif")] and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # paused mid-run, holding the output, while the second one runs
    try:
        assert first.poll() is None, "the first run ended before the second could start"
        second = decompress_tiffs(source, out, "--workers", 1)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(second, "another run is writing the output directory", str(out), code=1)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    for z in range(30):
        np.testing.assert_array_equal(tifffile.imread(out / f"{z:05d}.tif"), data + z)
    assert sorted(p.name for p in out.iterdir()) == [f"{z:05d}.tif" for z in range(30)]


def test_every_output_is_flushed_before_its_rename_and_the_directory_before_success(tmp_path, rng, monkeypatch):
    source = tmp_path / "in"
    written = write_inputs(source, ["00000.tif", "00001.tif"], rng)
    write_inputs(source, ["00002.tif"], rng, compression=None)  # copied as it is
    written["00002.tif"] = tifffile.imread(source / "00002.tif")
    out = tmp_path / "out"
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: object, dst: object) -> None:
        events.append(("replace", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    decompress.decompress_tiffs(source, out, overwrite=False, workers=1, verify=False, quiet=True)
    assert_same_pixels(out, written)
    for name in written:
        partial = str(out / f".{name}.partial")
        renamed = events.index(("replace", str(out / name)))
        assert ("fsync", partial) in events[:renamed], (name, events)
    last_rename = max(i for i, (kind, _) in enumerate(events) if kind == "replace")
    assert ("fsync", str(out)) in events[last_rename:], events


def test_files_are_processed_in_slice_number_order_not_name_order(tmp_path, rng):
    # Names sort 10, 100, 9; numbers 9, 10, 100. Every file is damaged, so each says when it is processed.
    source = tmp_path / "in"
    source.mkdir()
    for name in ("10.tif", "100.tif", "9.tif"):
        (source / name).write_bytes(b"II*\x00damaged")
    result = decompress_tiffs(source, tmp_path / "out", "--workers", 1)
    assert_one_line_error(result, "3 of 3 files failed (9.tif, 10.tif, 100.tif;", code=1)
    order = [
        line.split(": cannot read")[0].split(": ")[-1] for line in result.stderr.splitlines() if "cannot read" in line
    ]
    assert order == ["9.tif", "10.tif", "100.tif"], result.stderr


def test_a_page_libtiff_cannot_decode_is_decoded_by_tifffile(tmp_path, rng):
    # libtiff (imagecodecs' build) has no PNG-in-TIFF decoder (compression 34933); tifffile has.
    source = tmp_path / "in"
    written = write_inputs(source, ["00000.tif"], rng, compression="png")
    written |= write_inputs(source, ["00001.tif"], rng)
    with pytest.raises(Exception, match="34933"):
        import imagecodecs

        imagecodecs.tiff_decode((source / "00000.tif").read_bytes())
    out = tmp_path / "out"
    result = decompress_tiffs(source, out, "--verify")
    assert_ok(result)
    assert "2 files decompressed" in result.stderr
    assert_same_pixels(out, written)


def test_an_output_that_cannot_be_created_does_not_suggest_running_again(tmp_path, rng):
    source = tmp_path / "in"
    write_inputs(source, ["00000.tif"], rng)
    (tmp_path / "file").write_text("x")
    result = decompress_tiffs(source, tmp_path / "file" / "out")
    assert_one_line_error(result, "file", code=1)
    assert "continue" not in result.stderr and "run the same command" not in result.stderr


def test_a_full_disk_after_some_files_suggests_the_command_that_continues(tmp_path, rng, small_tmpfs):
    source = tmp_path / "in"
    source.mkdir()
    data = rng.integers(0, 65535, size=(512, 1024), dtype=np.uint16)  # 1 MiB each: 2 fit in 3 MiB, not 5
    for z in range(5):
        tifffile.imwrite(source / f"{z:05d}.tif", data, compression="zlib")
    result = decompress_tiffs(source, small_tmpfs / "out", "--workers", 1)
    assert_one_line_error(result, "no space left on the device", "then continue with:", code=1)


def test_a_directory_or_a_fifo_under_a_tiff_name_is_a_failed_file(tmp_path, rng):
    source = tmp_path / "in"
    written = write_inputs(source, ["00000.tif", "00003.tif"], rng)
    (source / "00001.tif").mkdir()
    os.mkfifo(source / "00002.tif")  # never opened: reading it would wait for a writer forever
    out = tmp_path / "out"
    result = decompress_tiffs(source, out, "--workers", 2)
    assert_one_line_error(result, "2 of 4 files failed (00001.tif, 00002.tif", code=1)
    assert "00001.tif: cannot read: it is a directory" in result.stderr
    assert "00002.tif: cannot read: it is not a regular file" in result.stderr
    assert_same_pixels(out, written)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tif", "00003.tif"]


def test_an_output_inside_a_zarr_store_is_refused(tmp_path, rng):
    """TIFFs written into a store would be taken for its files, and deleted with it by scroll_to_ome --overwrite."""
    write_inputs(tmp_path / "in", ["00000.tif", "00001.tif"], rng, compression="zlib")
    store = tmp_path / "scroll.zarr"
    assert_ok(run_script("scroll_to_ome.py", tmp_path / "in", store, "--chunk_size", 16, "--nlevels", 2))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    for output in (store, store / "0", store / "0" / "new"):
        result = decompress_tiffs(tmp_path / "in", output)
        assert_one_line_error(result, f"is inside the zarr store {store}", "write the TIFFs elsewhere", code=1)
        assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
