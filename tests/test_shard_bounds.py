"""A shard of more chunks than readers should fetch an index for is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_one_line_error, scroll_to_ome, write_stack


@pytest.fixture
def stack(tmp_path):
    directory = tmp_path / "tiffs"
    write_stack(directory, np.arange(4 * 20 * 30, dtype=np.uint16).reshape(4, 20, 30))
    return directory


def test_a_shard_of_more_than_65536_chunks_is_refused(stack, tmp_path):
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(stack, out, "--zarr_format", 3, "--chunk_size", 16, "--shard_shape", "256,1024,1040")
    assert_one_line_error(
        result, "--shard_shape 256,1024,1040 holds 66,560 chunks of 16^3; at most 65,536 per shard", code=2
    )
    assert not out.exists()


def test_a_shard_of_exactly_65536_chunks_is_planned(stack, tmp_path):
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(
        stack, out, "--zarr_format", 3, "--chunk_size", 16, "--shard_shape", "256,1024,1024",
        "--dry_run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "shards 256 x 1024 x 1024 (z, y, x)" in result.stdout
