"""Nothing read from the TIFFs is silently wrong: byte order per file, files replaced during a run,
bad slices zeroed by one rule whatever the cut of the work, the input checked on --resume, slice
names that are not readable files, stray far-off slice numbers and multi-page files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import scroll_to_ome as cli
from scrollzarr import pipeline as pipeline_module
from scrollzarr import tiffstack as tiffstack_module
from scrollzarr.tiffstack import SliceReadError, StackError, check_z_extent, numbered_tiffs, open_stack, read_rows

from conftest import assert_ok, assert_one_line_error, read_json, scroll_to_ome, write_stack
from reference import pyramid

CHUNK = 16


def check_levels(out: Path, expected: np.ndarray, nlevels: int) -> None:
    """Every level of ``out`` equals the reference pyramid of ``expected``."""
    group = zarr.open_group(str(out), mode="r")
    for index, level in enumerate(pyramid(expected, nlevels)):
        np.testing.assert_array_equal(group[str(index)][...], level, err_msg=f"level {index}")


@pytest.mark.parametrize(
    "layout",
    [{}, {"rowsperstrip": 5, "compression": "zlib"}, {"tile": (16, 16)}],
    ids=["direct", "strips", "tiles"],
)
def test_slices_of_either_byte_order_in_one_stack(tmp_path, rng, layout):
    """ImageJ writes big-endian TIFFs: a stack that mixes them with little-endian ones reads right."""
    volume = rng.integers(1, 65535, size=(6, 32, 40), dtype=np.uint16)
    directory = tmp_path / "slices"
    write_stack(directory, volume, **layout)
    for z in (1, 4, 5):
        tifffile.imwrite(directory / f"{z:05d}.tif", volume[z], byteorder=">", **layout)
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(directory, out, "--chunk_size", CHUNK, "--nlevels", 2))
    check_levels(out, volume, 2)


def test_a_multi_page_slice_is_a_bad_slice(tmp_path, rng):
    """A file holding a stack of images is not one z slice: its first page is not silently taken."""
    volume = rng.integers(1, 65535, size=(6, 32, 40), dtype=np.uint16)
    directory = tmp_path / "slices"
    write_stack(directory, volume)
    tifffile.imwrite(directory / "00002.tif", volume[2:5], imagej=True)  # an ImageJ stack: three pages
    out = tmp_path / "out.zarr"
    refused = scroll_to_ome(directory, out, "--chunk_size", CHUNK, "--nlevels", 2)
    assert_one_line_error(refused, "00002.tif: holds 3 images (pages)", "one image per z slice", code=1)
    assert not out.exists()
    assert_ok(scroll_to_ome(directory, out, "--chunk_size", CHUNK, "--nlevels", 2, "--bad_slices", "zero"))
    assert read_json(out / ".zattrs")["scrollzarr"]["bad_slices"] == [2]
    expected = volume.copy()
    expected[2] = 0
    check_levels(out, expected, 2)


def test_numbered_names_that_are_not_readable_files_are_bad_slices(tmp_path, rng):
    """A dangling symbolic link or a directory named like a slice is not skipped (nor, last, dropped)."""
    volume = rng.integers(1, 65535, size=(8, 32, 40), dtype=np.uint16)
    directory = tmp_path / "slices"
    paths = write_stack(directory, volume[:7])
    paths[3].unlink()
    (directory / "00003.tif").symlink_to(tmp_path / "gone" / "00003.tif")
    paths[5].unlink()
    (directory / "00005.tif").mkdir()
    (directory / "00007.tif").symlink_to("nowhere.tif")  # the last slice
    out = tmp_path / "out.zarr"
    refused = scroll_to_ome(directory, out, "--chunk_size", CHUNK, "--nlevels", 2)
    assert_one_line_error(
        refused,
        "3 slice(s) cannot be used",
        "00003.tif: a symbolic link to",
        "00005.tif: a directory, not a TIFF file",
        "00007.tif: a symbolic link to nowhere.tif, which does not exist",
        code=1,
    )
    assert not out.exists()
    result = scroll_to_ome(directory, out, "--chunk_size", CHUNK, "--nlevels", 2, "--bad_slices", "zero")
    assert_ok(result)
    assert read_json(out / ".zattrs")["scrollzarr"]["bad_slices"] == [3, 5, 7]
    expected = volume.copy()
    expected[[3, 5, 7]] = 0
    check_levels(out, expected, 2)


def replace_after_header_check(monkeypatch, path: Path, image: np.ndarray) -> None:
    """Once every header is checked, ``path`` is replaced by a new file renamed into place (as rsync does).

    The new file has a longer header, so its pixels start at another offset than the checked file's.
    """
    original = pipeline_module.open_stack

    def open_then_replace(*args, **kwargs):
        stack = original(*args, **kwargs)
        fresh = path.with_name(".fresh.tif")
        tifffile.imwrite(fresh, image, description="re-exported " * 50)
        os.replace(fresh, path)
        return stack

    monkeypatch.setattr(pipeline_module, "open_stack", open_then_replace)


@pytest.mark.parametrize("layout", [{}, {"compression": "zlib", "rowsperstrip": 8}], ids=["direct", "strips"])
def test_a_slice_replaced_after_its_header_check_is_a_bad_slice(tmp_path, rng, monkeypatch, capsys, layout):
    volume = rng.integers(1, 65535, size=(6, 32, 40), dtype=np.uint16)
    directory = tmp_path / "slices"
    paths = write_stack(directory, volume, **layout)
    replacement = rng.integers(1, 65535, size=(32, 40), dtype=np.uint16)
    argv = [str(directory), str(tmp_path / "a.zarr"), "--chunk_size", str(CHUNK), "--nlevels", "2", "--quiet"]
    replace_after_header_check(monkeypatch, paths[3], replacement)
    assert cli.main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert "00003.tif: cannot read slice 3 (the file changed after its header was checked" in errors[0]
    assert "or pass --bad_slices zero" in errors[0]

    write_stack(directory, volume, **layout)
    replace_after_header_check(monkeypatch, paths[3], replacement)
    out = tmp_path / "b.zarr"
    assert cli.main([str(directory), str(out), *argv[2:], "--bad_slices", "zero"]) == 0
    err = capsys.readouterr().err
    assert "00003.tif: cannot read slice 3 (the file changed after its header was checked" in err
    assert "written as zeros" in err
    monkeypatch.undo()
    assert read_json(out / ".zattrs")["scrollzarr"]["bad_slices"] == [3]
    expected = volume.copy()
    expected[3] = 0
    check_levels(out, expected, 2)


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store, by path, with its bytes."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def corrupt_strip(path: Path, index: int) -> None:
    """Overwrite the compressed bytes of strip ``index`` of ``path`` with garbage; the header stays intact."""
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages.first.dataoffsets[index], tif.pages.first.databytecounts[index]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * count)


def band_shape(directory: Path, out: Path, *args: object) -> tuple[int, int]:
    plan = scroll_to_ome(directory, out, *args, "--dry_run")
    assert_ok(plan)
    return tuple(map(int, re.search(r"level 0 read in bands of (\d+) x (\d+)", plan.stdout).groups()))


def test_a_slice_failing_mid_read_is_zeros_from_the_failing_strip_whatever_the_cut(tmp_path, rng, monkeypatch):
    """Whole planes, bands of rows, bands cut in x, and a run stopped and resumed: one store, the rule's."""
    volume = rng.integers(1, 65535, size=(20, 48, 600), dtype=np.uint16)
    directory = tmp_path / "slices"
    paths = write_stack(directory, volume, compression="zlib", rowsperstrip=4)
    corrupt_strip(paths[5], 5)  # rows 20-23
    corrupt_strip(paths[12], 9)  # rows 36-39
    expected = volume.copy()
    expected[5, 20:] = 0
    expected[12, 36:] = 0
    args = ["--chunk_size", CHUNK, "--nlevels", 3, "--bad_slices", "zero"]
    plan = scroll_to_ome(directory, tmp_path / "o.zarr", *args, "--workers", 1, "--dry_run", "--verbose")
    need = int(re.search(r"memory: (\d+) bytes", plan.stderr).group(1))
    cuts = [
        ["--workers", 2],
        ["--workers", 1, "--max_gb", need / 4 / 2**30],
        ["--workers", 1, "--max_gb", need / 16 / 2**30],
    ]
    shapes = [band_shape(directory, tmp_path / "o.zarr", *args, *cut) for cut in cuts]
    assert shapes == [(48, 600), (16, 600), (16, 256)]  # whole planes; bands of rows; bands cut in x too
    stores = []
    for index, cut in enumerate(cuts):
        out = tmp_path / str(index) / "out.zarr"
        result = scroll_to_ome(directory, out, *args, *cut)
        assert_ok(result)
        assert "00005.tif: cannot read slice 5" in result.stderr and "written as zeros from row 20 on" in result.stderr
        assert "00012.tif: cannot read slice 12" in result.stderr and "written as zeros from row 36 on" in result.stderr
        attributes = read_json(out / ".zattrs")["scrollzarr"]
        assert attributes["bad_slices"] == [5, 12]
        assert attributes["bad_slice_rows"] == {"5": 20, "12": 36}
        check_levels(out, expected, 3)
        stores.append(store_files(out))
    assert stores[1] == stores[0] and stores[2] == stores[0]

    # stopped in the bands of rows 16-32 (where slice 5 failed) or just after them, then resumed: rows 16-19
    # of slice 5 are read and rows 32 on are zeros although readable, as the record says
    original = pipeline_module._Run.convert_band
    for stop, band in [(5, ((16, 32), (256, 512))), (7, ((32, 48), (0, 256)))]:
        calls = []

        def stop_there(run, band, calls=calls, stop=stop):
            calls.append(band)
            if len(calls) == stop:
                raise KeyboardInterrupt
            original(run, band)

        monkeypatch.setattr(pipeline_module._Run, "convert_band", stop_there)
        out = tmp_path / f"resumed{stop}" / "out.zarr"
        assert cli.main([str(directory), str(out), *map(str, args), *map(str, cuts[2]), "--quiet"]) == 130
        assert calls[-1] == band
        monkeypatch.undo()
        assert_ok(scroll_to_ome(directory, out, *args, "--resume"))
        assert store_files(out) == stores[0]


@pytest.mark.parametrize("stray", ["scan_2000000.tif", "mask_20230205180739.tif"])
def test_a_stray_far_off_slice_number_is_refused_before_writing(tmp_path, rng, stray):
    """One file far from the others would make millions of empty planes (and, planned as a list, run out of memory)."""
    volume = rng.integers(1, 65535, size=(6, 16, 20), dtype=np.uint16)
    directory = tmp_path / "slices"
    write_stack(directory, volume)
    tifffile.imwrite(directory / stray, volume[0])
    out = tmp_path / "out.zarr"
    for dry_run in ([], ["--dry_run"]):
        result = scroll_to_ome(directory, out, "--chunk_size", CHUNK, *dry_run)
        assert_one_line_error(
            result, "7 slice files would be spread over", f"far from the others: {stray}", "--ranges ,,0:6", code=1
        )
        assert not out.exists()
    assert_ok(scroll_to_ome(directory, out, "--chunk_size", CHUNK, "--nlevels", 2, "--ranges", ",,0:6"))
    check_levels(out, volume, 2)


def test_z_stays_the_slice_number_for_a_run_of_slices_starting_far_in(tmp_path, rng):
    """Up to 100,000 planes without a file are allowed (more only if there are more files than that)."""
    directory = tmp_path / "slices"
    write_stack(directory, rng.integers(1, 65535, size=(3, 8, 8), dtype=np.uint16), first=100_000, digits=6)
    plan = scroll_to_ome(directory, tmp_path / "out.zarr", "--dry_run")
    assert_ok(plan)
    assert "level 0: 100003 x 8 x 8 (z, y, x)" in plan.stdout
    (directory / "100000.tif").rename(directory / "100003.tif")  # slices 100001-100003: 100,001 empty planes
    result = scroll_to_ome(directory, tmp_path / "out.zarr", "--dry_run")
    assert_one_line_error(result, "the first slice is number 100001", "--ranges ,,100001:", code=1)


def test_missing_slices_are_planned_as_runs(tmp_path, rng):
    """A gap of 90,000 numbers inside the stack is planned, reported and stored as one run of numbers."""
    volume = rng.integers(1, 65535, size=(4, 8, 8), dtype=np.uint16)
    directory = tmp_path / "slices"
    write_stack(directory, volume[:2], digits=6)
    write_stack(directory, volume[2:], first=90_002, digits=6)
    assert open_stack(numbered_tiffs(directory)).missing_runs(0, 90_004) == [(2, 90_002)]
    plan = scroll_to_ome(directory, tmp_path / "out.zarr", "--dry_run")
    assert_ok(plan)
    assert "missing slices (written as zeros): 2-90001" in plan.stdout


def stopped_while_finishing(monkeypatch, directory: Path, out: Path, *args: object) -> None:
    """``out`` as a run leaves it stopped after its last chunk, before its progress record is removed."""

    def stop(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module.progress, "remove", stop)
    assert cli.main([str(directory), str(out), *map(str, args), "--quiet"]) == 130
    monkeypatch.undo()


def test_resume_after_the_input_changed_is_refused_naming_the_files(tmp_path, rng, monkeypatch):
    volume = rng.integers(1, 65535, size=(20, 16, 20), dtype=np.uint16)
    directory = tmp_path / "slices"
    args = ["--chunk_size", CHUNK, "--nlevels", 2]
    changes = {
        "removed": lambda paths: paths[3].unlink(),
        "added": lambda paths: tifffile.imwrite(directory / "00020.tif", volume[0]),
        "changed": lambda paths: tifffile.imwrite(paths[7], volume[0]),
        "many removed": lambda paths: [path.unlink() for path in paths[:12]],
    }
    expected = {
        "removed": "1 removed (00003.tif)",
        "added": "1 added (00020.tif)",
        "changed": "1 changed (00007.tif)",
        "many removed": "12 removed (00000.tif, 00001.tif, 00002.tif, 00003.tif, 00004.tif and 7 more)",
    }
    for kind, change in changes.items():
        for path in directory.glob("*.tif"):
            path.unlink()
        paths = write_stack(directory, volume)
        out = tmp_path / kind / "out.zarr"
        stopped_while_finishing(monkeypatch, directory, out, *args)
        before = store_files(out)
        assert "scrollzarr_slices.json" in before
        change(paths)
        result = scroll_to_ome(directory, out, *args, "--resume")
        assert_one_line_error(
            result,
            f"cannot resume {out}: the input changed since the stopped run",
            expected[kind],
            "--overwrite",
            code=1,
        )
        assert store_files(out) == before
    (out / "scrollzarr_slices.json").unlink()  # a store of a run killed before it listed its input
    result = scroll_to_ome(directory, out, *args, "--resume")
    assert_one_line_error(result, "its list of slice files is missing from the output", "--overwrite", code=1)
    assert_ok(scroll_to_ome(directory, out, *args, "--overwrite"))
    assert not (out / "scrollzarr_slices.json").exists()  # removed with the record: the store is finished


def test_a_tiled_slice_failing_mid_read_is_zeros_from_row_0(tmp_path, rng):
    """A tiled slice is decoded whole: one damaged tile makes the whole slice zeros."""
    volume = rng.integers(1, 65535, size=(6, 32, 40), dtype=np.uint16)
    directory = tmp_path / "slices"
    paths = write_stack(directory, volume, compression="zlib", tile=(16, 16))
    corrupt_strip(paths[2], 4)  # a tile in the middle
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(directory, out, "--chunk_size", CHUNK, "--nlevels", 2, "--bad_slices", "zero")
    assert_ok(result)
    assert "00002.tif: cannot read slice 2" in result.stderr and "written as zeros" in result.stderr
    assert "from row" not in result.stderr
    assert read_json(out / ".zattrs")["scrollzarr"]["bad_slice_rows"] == {"2": 0}
    expected = volume.copy()
    expected[2] = 0
    check_levels(out, expected, 2)


def test_an_uncompressed_slice_failing_mid_read_is_zeros_from_the_failing_row(tmp_path, rng, monkeypatch, capsys):
    """A disk read error (injected: row 21 of slice 5 cannot be read) zeroes from that row, whole planes or
    bands of 32 rows read a stripe at a time alike."""
    volume = rng.integers(1, 65535, size=(20, 48, 40), dtype=np.uint16)
    directory = tmp_path / "slices"
    write_stack(directory, volume)
    original = tiffstack_module._read_direct

    def failing_read(stack, entry, rows, cols, out):
        if entry.z == 5 and rows[0] <= 21 < rows[1]:
            raise OSError(5, "Input/output error")
        original(stack, entry, rows, cols, out)

    monkeypatch.setattr(tiffstack_module, "_read_direct", failing_read)
    expected = volume.copy()
    expected[5, 21:] = 0
    args = ["--chunk_size", str(CHUNK), "--nlevels", "3", "--bad_slices", "zero", "--quiet"]
    stores = []
    for cut in (["--workers", "2"], ["--workers", "1", "--max_gb", "0.0003"]):
        out = tmp_path / cut[1] / "out.zarr"
        assert cli.main([str(directory), str(out), *args, *cut]) == 0
        err = capsys.readouterr().err
        assert "00005.tif: cannot read slice 5 ([Errno 5] Input/output error)" in err
        assert "written as zeros from row 21 on" in err
        check_levels(out, expected, 3)
        stores.append(store_files(out))
    assert stores[0] == stores[1]
    assert "bands of 32 x 40" in scroll_to_ome(directory, tmp_path / "o.zarr", *args[:-1], *cut, "--dry_run").stdout


def test_each_kind_of_change_to_a_checked_file_is_named(tmp_path, rng):
    volume = rng.integers(1, 65535, size=(3, 8, 10), dtype=np.uint16)
    paths = write_stack(tmp_path, volume)
    out = np.empty((8, 10), np.uint16)
    stack = open_stack(numbered_tiffs(tmp_path))
    tifffile.imwrite(tmp_path / "new.tif", volume[2])
    os.replace(tmp_path / "new.tif", paths[0])
    with open(paths[1], "ab") as handle:
        handle.write(b"appended")
    status = paths[2].stat()
    paths[2].write_bytes(paths[2].read_bytes()[::-1])  # the same size, other bytes
    os.utime(paths[2], ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    for z, what in [(0, "it was replaced by another file"), (1, "its size went from"), (2, "it was modified")]:
        with pytest.raises(
            SliceReadError, match=f"cannot read slice {z} .the file changed after its header was checked: {what}"
        ) as caught:
            read_rows(stack, z, (0, 8), (0, 10), out)
        assert caught.value.changed


def test_many_far_off_files_are_named_a_few_and_counted(tmp_path, rng):
    files = {z: tmp_path / f"{z:05d}.tif" for z in range(20)}
    files |= {z: tmp_path / f"scan_{z}.tif" for z in range(500_000, 500_007)}
    with pytest.raises(
        StackError,
        match=r"far from the others: scan_500000.tif, .* scan_500004.tif and 2 more; "
        r".*--ranges ,,0:20",
    ):
        check_z_extent(files, 0, 500_007)
