"""The pure downsampling functions against the whole-array references of tests/reference.py."""

import numpy as np
import pytest

from scrollzarr import downsample as ds

from reference import LEVEL


@pytest.mark.parametrize("algorithm", ["mean", "max", "nearest", "gaussian"])
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 1), (5, 7, 9), (6, 3, 4), (1, 8, 3)])
def test_matches_reference(algorithm, shape, rng):
    block = rng.integers(0, 12, size=shape, dtype=np.uint16)  # small values: many exact .5 ties
    result = ds.downsample(block, algorithm)
    assert result.dtype == block.dtype
    assert result.shape == tuple((n + 1) // 2 for n in shape)
    np.testing.assert_array_equal(result, LEVEL[algorithm](block))


def test_mean_rounds_ties_to_even():
    # blocks whose 8 voxels sum to 4, 12, 20: means 0.5, 1.5, 2.5 -> 0, 2, 2
    block = np.zeros((2, 2, 6), np.uint8)
    block[0, 0, 0:2] = (3, 1)
    block[0, 0, 2:4] = (6, 6)
    block[0, 0, 4:6] = (10, 10)
    np.testing.assert_array_equal(ds.downsample_mean(block)[0, 0], [0, 2, 2])


def test_mean_at_odd_edge_averages_only_existing_voxels():
    block = np.array([[[10, 20, 7]]], np.uint16)  # one plane, one row, three columns
    # first block: mean of 10 and 20; last block: only 7 exists
    np.testing.assert_array_equal(ds.downsample_mean(block), [[[15, 7]]])


def test_mean_does_not_overflow_uint16():
    block = np.full((2, 2, 2), 65535, np.uint16)
    assert ds.downsample_mean(block)[0, 0, 0] == 65535


def test_gaussian_with_context_equals_whole_array(rng):
    volume = rng.integers(0, 60000, size=(20, 18, 22), dtype=np.uint16)
    whole = ds.downsample(volume, "gaussian")
    # the block z 8:16 (output 4:8) with 3 voxels of context on each side in z only
    block = volume[5:19]
    part = ds.downsample_gaussian(block, (slice(3, 11), slice(None), slice(None)))
    np.testing.assert_array_equal(part, whole[4:8])


def test_to_uint8_divides_by_256():
    values = np.array([0, 255, 256, 511, 65535], np.uint16)
    np.testing.assert_array_equal(ds.to_uint8(values), [0, 0, 1, 1, 255])
    assert ds.to_uint8(values).dtype == np.uint8


def test_halved_shape():
    assert ds.halved_shape((7, 8, 1)) == (4, 4, 1)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint32, np.uint8])
def test_mean_of_other_integer_types(dtype, rng):
    info = np.iinfo(dtype)
    block = rng.integers(max(info.min, -(2**30)), min(info.max, 2**30), size=(5, 6, 7)).astype(dtype)
    np.testing.assert_array_equal(ds.downsample_mean(block), LEVEL["mean"](block))
    small = rng.integers(-3 if info.min < 0 else 0, 4, size=(6, 6, 6)).astype(dtype)  # many exact halves
    np.testing.assert_array_equal(ds.downsample_mean(small), LEVEL["mean"](small))
