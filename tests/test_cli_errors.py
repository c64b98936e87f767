"""Every error of scroll_to_ome: one line on stderr, the right exit code, no traceback, nothing lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import assert_ok, assert_one_line_error, read_json, scroll_to_ome, write_stack


@pytest.fixture
def stack(tmp_path, rng):
    directory = tmp_path / "slices"
    write_stack(directory, rng.integers(1, 60000, size=(12, 30, 40), dtype=np.uint16))
    return directory


def snapshot(directory):
    """Every file below ``directory`` with its bytes, to show nothing changed."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_missing_input_directory(tmp_path):
    result = scroll_to_ome(tmp_path / "nowhere", tmp_path / "out.zarr")
    assert_one_line_error(result, "input directory", "nowhere does not exist", code=1)
    assert not (tmp_path / "out.zarr").exists()


def test_input_is_a_file(tmp_path):
    (tmp_path / "file.tif").write_text("x")
    assert_one_line_error(scroll_to_ome(tmp_path / "file.tif", tmp_path / "o.zarr"), "is not a directory", code=1)


def test_output_must_end_in_zarr(tmp_path, stack):
    result = scroll_to_ome(stack, tmp_path / "out.ome")
    assert_one_line_error(result, "must end in .zarr", "out.zarr", code=2)
    assert not (tmp_path / "out.ome").exists()


def test_existing_output_needs_overwrite(tmp_path, stack):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", 16, "--nlevels", 2))
    before = snapshot(out)
    result = scroll_to_ome(stack, out, "--chunk_size", 8)
    assert_one_line_error(result, "already exists", "pass --overwrite", code=1)
    assert snapshot(out) == before


def test_overwrite_refuses_a_directory_that_is_not_a_store(tmp_path, stack):
    out = tmp_path / "precious.zarr"
    out.mkdir()
    (out / "thesis.txt").write_text("three years of work")
    result = scroll_to_ome(stack, out, "--overwrite")
    assert_one_line_error(result, "is not a zarr store", "--overwrite only replaces zarr stores", code=1)
    assert (out / "thesis.txt").read_text() == "three years of work"


def test_overwrite_refuses_an_output_that_contains_the_input(tmp_path, rng):
    out = tmp_path / "data.zarr"
    inner = out / "slices"
    write_stack(inner, rng.integers(1, 100, size=(3, 8, 8), dtype=np.uint16))
    (out / ".zgroup").write_text('{"zarr_format": 2}')
    before = snapshot(out)
    result = scroll_to_ome(inner, out, "--overwrite")
    assert_one_line_error(result, "is or contains the input directory", code=1)
    assert snapshot(out) == before


def test_overwrite_refuses_a_file(tmp_path, stack):
    out = tmp_path / "out.zarr"
    out.write_text("not a directory")
    assert_one_line_error(scroll_to_ome(stack, out, "--overwrite"), "is not a directory", code=1)
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize(
    ("ranges", "fragment"),
    [
        ("0:10:2", "only start:stop (step 1)"),
        ("5", "single index"),
        ("a:b,,", "not of the form start:stop"),
        ("1:2,1:2,1:2,1:2", "at most three"),
        ("100:200,,", "x starts at 100, past the data"),
        (",,50:", "z starts at 50, past the data"),
        (",20:10,", "selects nothing"),
    ],
)
def test_bad_ranges(tmp_path, stack, ranges, fragment):
    result = scroll_to_ome(stack, tmp_path / "out.zarr", "--ranges", ranges)
    assert_one_line_error(result, "--ranges", fragment, code=2)
    assert not (tmp_path / "out.zarr").exists()


def test_garbage_tiff_is_named_and_the_old_store_is_kept(tmp_path, stack):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", 16, "--nlevels", 2))
    before = snapshot(out)
    (stack / "00005.tif").write_bytes(b"\x00" * 100)
    result = scroll_to_ome(stack, out, "--overwrite")
    assert_one_line_error(result, "00005.tif", "cannot read the TIFF header", code=1)
    assert snapshot(out) == before


def test_truncated_tiff_is_named_before_anything_is_written(tmp_path, stack):
    path = stack / "00007.tif"
    path.write_bytes(path.read_bytes()[:1000])
    result = scroll_to_ome(stack, tmp_path / "out.zarr")
    assert_one_line_error(result, "00007.tif: truncated", "copy or download this slice again", code=1)
    assert not (tmp_path / "out.zarr").exists()


def test_slice_of_the_wrong_shape(tmp_path, stack):
    tifffile.imwrite(stack / "00004.tif", np.zeros((30, 41), np.uint16))
    result = scroll_to_ome(stack, tmp_path / "out.zarr")
    assert_one_line_error(result, "00004.tif is 30 x 41 uint16, but 00000.tif is 30 x 40 uint16", code=1)
    assert not (tmp_path / "out.zarr").exists()


def test_duplicate_slice_numbers(tmp_path, stack):
    tifffile.imwrite(stack / "5.tiff", np.zeros((30, 40), np.uint16))
    assert_one_line_error(scroll_to_ome(stack, tmp_path / "o.zarr"), "slice 5 appears twice: 00005.tif and 5.tiff")


def test_no_tiffs(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(scroll_to_ome(tmp_path / "empty", tmp_path / "o.zarr"), "no TIFF files named by slice")


def test_a_slice_that_cannot_be_decoded_during_the_run(tmp_path, rng):
    directory = tmp_path / "slices"
    paths = write_stack(directory, rng.integers(1, 60000, size=(6, 30, 40), dtype=np.uint16), compression="zlib")
    data = bytearray(paths[3].read_bytes())
    data[200:400] = b"\xff" * 200  # the header is intact, the compressed pixels are not
    paths[3].write_bytes(bytes(data))
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(directory, out, "--chunk_size", 16)
    assert_one_line_error(result, "00003.tif: cannot read slice 3", code=1)
    # the store was created before the slice failed: it must say it is unfinished, not look converted
    assert "multiscales" not in read_json(out / ".zattrs")
    assert (out / "scrollzarr_progress.json").is_file()


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (["--nlevels", "0"], "--nlevels must be at least 1", 2),
        (["--chunk_size", "0"], "--chunk_size must be at least 1", 2),
        (["--max_gb", "-1"], "--max_gb must be a positive number", 2),
        (["--algorithm", "median"], "argument --algorithm: invalid choice", 2),
        (["--obytes", "2"], "argument --obytes: invalid choice", 2),
        (["--nlevels", "many"], "argument --nlevels: invalid int value", 2),
        (["--quiet", "--verbose"], "not allowed with argument", 2),
    ],
)
def test_bad_option_values(tmp_path, stack, args, fragment, code):
    result = scroll_to_ome(stack, tmp_path / "out.zarr", *args)
    assert_one_line_error(result, fragment, code=code)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.zarr").exists()


def test_obytes_needs_integer_input(tmp_path, rng):
    write_stack(tmp_path / "f", rng.random((3, 8, 8), dtype=np.float32))
    result = scroll_to_ome(tmp_path / "f", tmp_path / "out.zarr", "--obytes", 1)
    assert_one_line_error(result, "--obytes 1 converts uint16 to uint8, but the slices are float32", code=2)


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (["--first_new_level", "0"], "--first_new_level must be 1 or more", 2),
        (["--first_new_level", "3", "--nlevels", "3"], "leaves nothing to build with --nlevels 3", 2),
        (["--first_new_level", "4", "--nlevels", "6"], "needs level 3, but", 2),
        (["--first_new_level", "1", "--zarr_only"], "cannot be combined with --zarr_only", 2),
        (["--first_new_level", "1", "--obytes", "1"], "--obytes applies when converting TIFFs", 2),
    ],
)
def test_first_new_level_errors(tmp_path, stack, args, fragment, code):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", 16, "--nlevels", 2))
    before = snapshot(out)
    assert_one_line_error(scroll_to_ome(stack, out, *args), fragment, code=code)
    assert snapshot(out) == before


def test_first_new_level_on_something_that_is_not_an_ome_zarr(tmp_path, stack):
    plain = tmp_path / "plain.zarr"
    assert_ok(scroll_to_ome(stack, plain, "--zarr_only", "--chunk_size", 16))
    result = scroll_to_ome(stack, plain, "--first_new_level", 1)
    assert_one_line_error(result, "is not a finished OME-Zarr", code=1)
    result = scroll_to_ome(stack, tmp_path / "absent.zarr", "--first_new_level", 1)
    assert_one_line_error(result, "is not a finished OME-Zarr", code=1)


def test_output_under_a_file_is_an_os_error_line(tmp_path, stack):
    (tmp_path / "afile").write_text("x")
    result = scroll_to_ome(stack, tmp_path / "afile" / "out.zarr")
    assert_one_line_error(result, "Not a directory", code=1)


def test_installed_command_is_on_path():
    command = Path(sys.executable).parent / "scroll_to_ome"
    assert command.exists(), "pip install . must put scroll_to_ome beside the interpreter"
    result = subprocess.run([command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--first_new_level" in result.stdout


def test_a_stop_while_the_resume_command_cannot_be_worked_out_is_still_one_line(capsys):
    """SIGTERM in the middle of ``import zarr`` leaves zarr half-imported, and working out the command that
    continues (which reads the store with zarr) then raises: the stop is still reported in one line, exit 143."""
    from scrollzarr._cli import EXIT_TERMINATED, Terminated, run

    def body() -> None:
        raise Terminated

    def resume() -> str | None:
        raise ImportError("cannot import name 'Store' from partially initialized module 'zarr.abc.store'")

    assert run("scroll_to_ome", body, resume) == EXIT_TERMINATED
    assert capsys.readouterr().err == "scroll_to_ome: interrupted\n"
