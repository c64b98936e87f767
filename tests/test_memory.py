"""The memory model's choices: bands that fit the bound and stay chunk-aligned for what they stream."""

import pytest

from scrollzarr import memory
from scrollzarr.downsample import level_shapes
from scrollzarr.errors import UsageError


def layout(shape=(256, 2048, 2048), chunk=128, nlevels=6, algorithm="mean", workers=2, decode_bytes=0):
    return memory.Layout(level_shapes(shape, nlevels), chunk, 2, 2, shape[1:], decode_bytes, algorithm, workers)


def test_without_a_bound_whole_planes_stream_every_level():
    plan = memory.plan_bands(layout(), None)
    assert (plan.rows, plan.cols, plan.streamed) == (2048, 2048, 5)
    # the streams hold one chunk row of each level (a level shallower than a chunk, whole): 128 planes of 2048^2,
    # 1024^2, ... uint16, then 32, 16 and 8 planes
    streams = sum(min(128, 256 // 2**level) * (2048 // 2**level) ** 2 * 2 for level in range(6))
    assert streams <= plan.nbytes <= streams + 2**27


@pytest.mark.parametrize("fraction", [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32])
@pytest.mark.parametrize("algorithm", ["mean", "gaussian"])
def test_bands_fit_the_bound_and_stay_aligned(fraction, algorithm):
    shape_layout = layout(algorithm=algorithm)
    budget = int(memory.plan_bands(shape_layout, None).nbytes * fraction)
    plan = memory.plan_bands(shape_layout, budget)
    assert plan.nbytes <= budget
    assert plan.rows * plan.cols < 2048 * 2048
    assert plan.rows % (128 * 2**plan.streamed) == 0 and plan.cols % 128 == 0
    if algorithm == "gaussian":
        assert plan.streamed == 0  # its context crosses band sides: only whole planes stream


def test_smaller_bounds_never_give_bigger_bands():
    shape_layout = layout()
    full = memory.plan_bands(shape_layout, None).nbytes
    sizes = [memory.plan_bands(shape_layout, int(full / f)).nbytes for f in (1.5, 2, 3, 4, 6, 8, 12, 16)]
    assert sizes == sorted(sizes, reverse=True)


def test_a_bound_below_one_chunk_is_refused_with_the_need():
    # the run's need, not the band's: with nothing streamed the read-back levels need 0.172 GB (2 workers)
    with pytest.raises(UsageError, match=r"--max_gb 0.001 is too small for chunks of 128: at least 0\.1"):
        memory.plan_bands(layout(), int(0.001 * 2**30))


def test_read_back_below_one_chunk_per_worker_is_refused_with_the_whole_need():
    shape_layout = layout(workers=2)
    need = memory.read_back_need(shape_layout, 2)
    budget = need - 1
    with pytest.raises(UsageError, match=rf"--max_gb {budget / 2**30:.3g} is too small for chunks of 128"):
        memory.read_back_blocks(shape_layout, 2, budget)
    blocks = memory.read_back_blocks(shape_layout, 2, need)
    assert memory.read_back_cost(shape_layout, 2, blocks) <= need


def test_compressed_slices_count_one_decoded_strip_per_worker():
    plain = memory.band_cost(layout(), 256, 2048, 0)
    compressed = memory.band_cost(layout(decode_bytes=64 * 2048 * 2), 256, 2048, 0)
    assert compressed - plain == 2 * 64 * 2048 * 2


def test_read_back_blocks_fit_the_share_of_each_worker():
    shape_layout = layout(workers=2)
    budget = 200 * 2**20
    blocks = memory.read_back_blocks(shape_layout, 1, budget)
    assert len(blocks) == 5
    assert memory.read_back_cost(shape_layout, 1, blocks) <= budget
    assert all(block[0] == min(128, level[0]) for block, level in zip(blocks, shape_layout.shapes[1:], strict=True))
