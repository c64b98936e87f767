"""--resume where there is nothing to continue: a finished store is never called a store left half-emptied
(that message ends "start again with --overwrite", which would throw the finished work away)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from scrollzarr import progress

from conftest import assert_ok, assert_one_line_error, scroll_to_ome, store_files, write_stack

ARGS = ["--chunk_size", 16, "--nlevels", 2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nothing") / "slices"
    write_stack(directory, np.random.default_rng(7).integers(1, 60000, size=(20, 30, 40), dtype=np.uint16))
    return directory


@pytest.mark.parametrize("layout", [[], ["--preset", "v3-sharded", "--chunk_size", 16, "--shard_shape", "16,32,32"]])
def test_a_finished_store_is_refused_as_finished_not_as_half_emptied(stack, tmp_path, layout):
    out = tmp_path / "done.zarr"
    assert_ok(scroll_to_ome(stack, out, *ARGS, *layout, "--quiet"))
    before = store_files(out)
    result = scroll_to_ome(stack, out, *ARGS, *layout, "--resume")
    assert_one_line_error(result, f"nothing to resume: {out} is not an unfinished scroll_to_ome conversion", code=1)
    assert "emptied" not in result.stderr
    assert store_files(out) == before and not (out / ".scrollzarr.lock").exists()


def test_a_missing_output_is_named_as_missing(stack, tmp_path):
    out = tmp_path / "none.zarr"
    result = scroll_to_ome(stack, out, *ARGS, "--resume")
    assert_one_line_error(result, f"nothing to resume: {out} does not exist; run without --resume", code=1)
    assert not out.exists()


def test_a_lock_file_alone_is_no_run_to_continue_but_a_new_run_may_start(stack, tmp_path):
    """What a run killed before its first write (or an --overwrite killed after its emptying) leaves: --resume
    says so in one line, and the command without it writes the store."""
    expected = tmp_path / "expected" / "out.zarr"
    assert_ok(scroll_to_ome(stack, expected, *ARGS, "--quiet"))
    out = tmp_path / "run" / "out.zarr"
    out.mkdir(parents=True)
    (out / ".scrollzarr.lock").touch()
    assert_one_line_error(scroll_to_ome(stack, out, *ARGS, "--resume"), "nothing to resume", "--overwrite", code=1)
    assert_ok(scroll_to_ome(stack, out, *ARGS, "--quiet"))
    assert store_files(out) == store_files(expected)


def test_a_store_an_overwrite_was_emptying_is_still_named_so(stack, tmp_path):
    """Root metadata and record gone, levels left: the emptying's own trace."""
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, *ARGS, "--quiet"))
    for name in (".zattrs", ".zgroup", progress.KEY):
        (out / name).unlink(missing_ok=True)
    (out / ".scrollzarr.lock").touch()
    shutil.rmtree(out / "1")
    result = scroll_to_ome(stack, out, *ARGS, "--resume")
    assert_one_line_error(result, "nothing to resume", "stopped while it emptied it for --overwrite", code=1)
