"""Wide shards cost the levels built from the level above no more memory than chunks do (each shard is built
a chunk at a time): the memory model's figures for a whole scroll, and the peak resident memory of a real
run under --max_gb."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_convert import default_need, measured_run

from scrollzarr import memory
from scrollzarr.downsample import level_shapes

from conftest import store_files, write_stack

SCROLL1 = (14376, 8096, 7888)  # z, y, x


def scroll1_layout(unit: tuple[int, int, int] | None, workers: int = 16) -> memory.Layout:
    return memory.Layout(
        shapes=level_shapes(SCROLL1, 6), chunk=128, in_itemsize=2, out_itemsize=2, slice_shape=SCROLL1[1:],
        decode_bytes=0, algorithm="mean", workers=workers, unit=unit, encoded=unit is not None,
    )  # fmt: skip


def test_read_back_needs_one_chunk_per_worker_whatever_the_shard():
    """The reviewer's case: Scroll 1, 16 workers, v3-sharded's 128 x 1024 x 1024 shards.  Read-back costs a
    chunk's work per worker and zarr's decoding of the level above (28 chunks a worker, measured), not a shard's
    256 x 2048 x 2048 voxels of the level above per worker (76 GiB in all, before)."""
    sharded = scroll1_layout((128, 1024, 1024))
    chunk = 128**3 * 2
    # per worker: zarr's decoding (28), a chunk's downsampling (its 256^3 source and temporaries: 20), and the
    # writer's padded and encoded chunk buffers (4); not a shard's 2 GiB of source
    assert memory.read_back_need(sharded, 1) <= 16 * (28 + 20 + 4) * chunk < 4 * 2**30
    blocks = memory.read_back_blocks(sharded, 1, 8 * 2**30)
    assert blocks == ((128, 1024, 1024),) * 5  # one shard a task: no shard has two writers
    bands = memory.plan_bands(sharded, 8 * 2**30)  # refused before: "at least 80.3 GB is needed"
    assert bands.nbytes <= 8 * 2**30 and bands.rows % 1024 == 0


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process /proc/self/status")
def test_max_gb_bounds_the_peak_memory_of_a_sharded_run(tmp_path, rng):
    """At 1/4 of the default need, in shards of 4 x 8 chunks: peak resident memory <= the bound + 256 MiB
    (the interpreter and its libraries: about 120 MiB),
    which the default run exceeds; the same files as the default run.  (Level 0 comes from the TIFFs in
    bands of whole shards, so a shard as wide as the plane cannot be cut: README, "How the work is done".)"""
    tile = rng.integers(1, 65535, size=(64, 256, 256), dtype=np.uint16)
    volume = np.tile(tile, (1, 8, 8))  # 64 slices of 2048 x 2048: 512 MiB
    write_stack(tmp_path / "slices", volume)
    del tile, volume
    args = ["--chunk_size", 64, "--nlevels", 3, "--workers", 2, "--zarr_format", 3, "--compressor", "blosc-lz4"]
    args += ["--shard_shape", "64,256,512"]
    bound = default_need(tmp_path / "slices", tmp_path / "o.zarr", *args) / 4
    default_store, bounded_store = tmp_path / "default" / "out.zarr", tmp_path / "bounded" / "out.zarr"
    _, default_peak = measured_run(tmp_path / "slices", default_store, *args)
    _, peak = measured_run(tmp_path / "slices", bounded_store, *args, "--max_gb", bound / 2**30)
    assert peak <= bound + 2**28 < default_peak, (peak, bound, default_peak)
    assert store_files(bounded_store) == store_files(default_store)
