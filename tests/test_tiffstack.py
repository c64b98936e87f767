"""Discovery and header checks on real TIFF files."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from scrollzarr.tiffstack import StackError, numbered_tiffs, open_stack, read_rows

from conftest import write_stack


def test_numbers_come_from_names_and_other_files_are_ignored(tmp_path, rng):
    image = rng.integers(0, 100, (4, 5), dtype=np.uint16)
    for name in ["00000.tif", "scan_0002.tiff", "7.TIF", "notes.txt", "preview.tif", "00003.tif.bak", "mask.png"]:
        tifffile.imwrite(tmp_path / name, image) if "tif" in name.lower() else (tmp_path / name).write_text("x")
    (tmp_path / "00009.tif").mkdir()  # a directory with a slice-like name is kept, to be reported as bad
    found = numbered_tiffs(tmp_path)
    assert {z: p.name for z, p in found.items()} == {0: "00000.tif", 2: "scan_0002.tiff", 7: "7.TIF", 9: "00009.tif"}


def test_gaps_are_reported_by_missing(tmp_path, rng):
    volume = rng.integers(0, 100, (6, 4, 5), dtype=np.uint16)
    paths = write_stack(tmp_path, volume)
    paths[2].unlink()
    paths[3].unlink()
    stack = open_stack(numbered_tiffs(tmp_path))
    assert sorted(stack.slices) == [0, 1, 4, 5]
    assert stack.missing_runs(0, 6) == [(2, 4)]


def test_duplicate_numbers_name_both_files(tmp_path, rng):
    image = rng.integers(0, 100, (4, 5), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "0001.tif", image)
    tifffile.imwrite(tmp_path / "1.tiff", image)
    with pytest.raises(StackError, match=r"slice 1 appears twice: 0001.tif and 1.tiff"):
        numbered_tiffs(tmp_path)


def test_no_tiff_and_missing_directory(tmp_path):
    (tmp_path / "readme.txt").write_text("no slices here")
    with pytest.raises(StackError, match="no TIFF files named by slice number"):
        numbered_tiffs(tmp_path)
    with pytest.raises(StackError, match="does not exist"):
        numbered_tiffs(tmp_path / "nope")


def test_differing_shape_or_dtype_names_the_files(tmp_path, rng):
    write_stack(tmp_path, rng.integers(0, 100, (3, 4, 5), dtype=np.uint16))
    tifffile.imwrite(tmp_path / "00003.tif", np.zeros((4, 6), np.uint16))
    with pytest.raises(StackError, match=r"00003.tif is 4 x 6 uint16, but 00000.tif is 4 x 5 uint16"):
        open_stack(numbered_tiffs(tmp_path))
    tifffile.imwrite(tmp_path / "00003.tif", np.zeros((4, 5), np.uint8))
    with pytest.raises(StackError, match=r"00003.tif is 4 x 5 uint8"):
        open_stack(numbered_tiffs(tmp_path))


def test_truncated_and_garbage_files_are_found_from_headers(tmp_path, rng):
    paths = write_stack(tmp_path, rng.integers(0, 100, (3, 40, 50), dtype=np.uint16))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(StackError, match=r"00001.tif: truncated"):
        open_stack(numbered_tiffs(tmp_path))
    paths[1].write_bytes(b"this is not a tiff at all")
    with pytest.raises(StackError, match=r"00001.tif: cannot read the TIFF header"):
        open_stack(numbered_tiffs(tmp_path))


def test_rgb_slice_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "00000.tif", np.zeros((4, 5, 3), np.uint8), photometric="rgb")
    with pytest.raises(StackError, match="not a single-channel 2D slice"):
        open_stack(numbered_tiffs(tmp_path))


@pytest.mark.parametrize(
    "imwrite",
    [
        {},
        {"rowsperstrip": 3},
        {"compression": "zlib", "rowsperstrip": 4},
        {"compression": "lzw"},
        {"byteorder": ">"},
        {"tile": (16, 16)},
    ],
    ids=["contiguous", "strips", "zlib", "lzw", "big-endian", "tiled"],
)
def test_read_rows_returns_exactly_the_asked_pixels(tmp_path, rng, imwrite):
    volume = rng.integers(0, 65535, (2, 37, 41), dtype=np.uint16)
    write_stack(tmp_path, volume, **imwrite)
    stack = open_stack(numbered_tiffs(tmp_path))
    out = np.empty((10, 41), np.uint16)
    read_rows(stack, 1, (20, 30), (0, 41), out)
    np.testing.assert_array_equal(out, volume[1, 20:30])
    part = np.empty((12, 9), np.uint16)
    read_rows(stack, 0, (25, 37), (30, 39), part)
    np.testing.assert_array_equal(part, volume[0, 25:37, 30:39])
    read_rows(stack, 5, (0, 12), (0, 9), part)  # no file for slice 5: zeros
    assert not part.any()


def test_a_file_that_shrinks_after_discovery_is_reported(tmp_path, rng):
    paths = write_stack(tmp_path, rng.integers(0, 100, (2, 40, 50), dtype=np.uint16))
    stack = open_stack(numbered_tiffs(tmp_path))
    Path(paths[1]).write_bytes(paths[1].read_bytes()[:500])
    with pytest.raises(StackError, match=r"00001.tif: cannot read slice 1"):
        read_rows(stack, 1, (0, 40), (0, 50), np.empty((40, 50), np.uint16))
