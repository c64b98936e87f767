"""The conversion's other options in a sharded, compressed zarr 3 store: every downsampling algorithm, a crop
(`--ranges`, whose translation goes into the 0.5 metadata), a memory bound that cuts the work and
`--workers`, each read back by zarr and compared with tests/reference.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image as ImageV05

from conftest import assert_ok, scroll_to_ome, store_files, write_stack
from reference import pyramid

SHAPE = (41, 66, 75)  # z, y, x: no axis a multiple of the chunk or of the shard
CHUNK = 16
NLEVELS = 3
SHARDED = ["--zarr_format", 3, "--compressor", "blosc-zstd", "--shard_shape", "16,32,48", "--chunk_size", CHUNK]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, np.ndarray]:
    volume = np.random.default_rng(29).integers(1, 65535, size=SHAPE, dtype=np.uint16)
    volume[:20, :40, :] = 0  # whole zero shards and zero chunks beside non-zero ones
    directory = tmp_path_factory.mktemp("options") / "slices"
    write_stack(directory, volume)
    return directory, volume


def levels(store: Path) -> list[np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return [group[str(level)][...] for level in range(NLEVELS)]


@pytest.mark.parametrize("algorithm", ["mean", "nearest", "max", "gaussian"])
def test_every_algorithm_in_a_sharded_compressed_store(stack, tmp_path, algorithm):
    directory, volume = stack
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(directory, out, *SHARDED, "--nlevels", NLEVELS, "--algorithm", algorithm, "--quiet"))
    for got, expected in zip(levels(out), pyramid(volume, NLEVELS, algorithm), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("algorithm", "max_gb"), [("mean", 0.002), ("gaussian", 0.015)])
def test_a_memory_bound_and_workers_write_the_same_files(stack, tmp_path, algorithm, max_gb):
    """Bands of rows, read-back levels and one or two workers: the files of the whole-plane run, byte for byte."""
    directory, _ = stack
    common = [*SHARDED, "--nlevels", NLEVELS, "--algorithm", algorithm, "--quiet"]
    whole, cut = tmp_path / "whole" / "out.zarr", tmp_path / "cut" / "out.zarr"  # one name: it is in the metadata
    assert_ok(scroll_to_ome(directory, whole, *common, "--workers", 1))
    assert_ok(scroll_to_ome(directory, cut, *common, "--workers", 2, "--max_gb", max_gb))
    dry = scroll_to_ome(directory, tmp_path / "plan.zarr", *common, "--workers", 2, "--max_gb", max_gb, "--dry_run")
    assert "from the stored level above" in dry.stdout, dry.stdout  # the bound did cut the work
    assert store_files(cut) == store_files(whole)


def test_a_crop_in_a_sharded_store_carries_its_translation(stack, tmp_path):
    directory, volume = stack
    out = tmp_path / "crop.zarr"
    # x 5:70, y 3:60, z 7:40 (the command line's order)
    assert_ok(scroll_to_ome(directory, out, *SHARDED, "--nlevels", NLEVELS, "--ranges", "5:70,3:60,7:40", "--quiet"))
    for got, expected in zip(levels(out), pyramid(volume[7:40, 3:60, 5:70], NLEVELS), strict=True):
        np.testing.assert_array_equal(got, expected)
    ImageV05.from_zarr(zarr.open_group(str(out), mode="r"))
    datasets = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    for level, dataset in enumerate(datasets):
        transforms = {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}
        assert transforms == {"scale": [2.0**level] * 3, "translation": [7.0, 3.0, 5.0]}
