"""memory.task_band: the band of level-0 tasks that stream their box through the levels below (so the largest
levels are not read back from the store)."""

from __future__ import annotations

import math

from scrollzarr import memory


def layout(shapes, unit=128, algorithm="mean", workers=1, shard=None, decode_bytes=0):
    return memory.Layout(
        shapes=shapes,
        chunk=unit,
        in_itemsize=2,
        out_itemsize=2,
        slice_shape=shapes[0][1:],
        decode_bytes=decode_bytes,
        algorithm=algorithm,
        workers=workers,
        unit=shard,
    )


def shapes_of(shape, nlevels):
    shapes = [shape]
    for _ in range(nlevels - 1):
        shapes.append(tuple(-(-n // 2) for n in shapes[-1]))
    return tuple(shapes)


def tasks_of(plan_layout, band):
    nz, height, _ = plan_layout.shapes[0]
    depth = memory.task_depth(plan_layout.write_unit[0], nz, band.streamed + 1)
    return math.ceil(nz / depth) * math.ceil(height / band.rows)


def test_the_bench_volume_on_two_workers_is_cut_into_tasks_that_write_several_levels():
    bench = layout(shapes_of((256, 2048, 2048), 6), decode_bytes=64 * 2048 * 2)
    band = memory.task_band(bench, None, 2)
    assert band is not None and band.streamed >= 1
    assert band.cols == 2048 and band.rows % (128 * 2**band.streamed) == 0
    assert tasks_of(bench, band) >= 4  # two for each of the two workers
    # without --max_gb a task holds no more than the run on one machine does by default
    assert band.nbytes == memory.band_cost(bench, band.rows, band.cols, band.streamed)
    assert band.nbytes <= memory.band_cost(bench, 2048, 2048, 5)


def test_gaussian_and_a_budget_for_one_level_only_leave_level_0_tasks_as_they_were():
    shapes = shapes_of((256, 2048, 2048), 6)
    assert memory.task_band(layout(shapes, algorithm="gaussian"), None, 2) is None
    one_level = memory.band_cost(layout(shapes), 128, 2048, 0)
    assert memory.task_band(layout(shapes), one_level, 1) is None


def test_any_band_chosen_is_whole_units_of_every_level_it_writes_fits_and_feeds_the_slots(rng):
    for _ in range(300):
        unit = int(rng.choice([16, 32, 64, 128]))
        shape = tuple(int(n) for n in rng.integers(1, 1500, size=3))
        nlevels = int(rng.integers(1, 7))
        plan_layout = layout(shapes_of(shape, nlevels), unit=unit, workers=int(rng.integers(1, 4)))
        budget = None if rng.random() < 0.2 else int(rng.integers(10**4, 10**9))
        parallel = int(rng.integers(1, 64))
        band = memory.task_band(plan_layout, budget, parallel)
        if band is None:
            continue
        step = unit * 2**band.streamed
        assert 1 <= band.streamed < nlevels
        assert band.rows % step == 0 or band.rows == shape[1]
        assert band.cols == shape[2]
        assert band.nbytes == memory.band_cost(plan_layout, band.rows, band.cols, band.streamed)
        limit = budget if budget is not None else memory.band_cost(plan_layout, shape[1], shape[2], nlevels - 1)
        assert band.nbytes <= limit
        assert tasks_of(plan_layout, band) >= 2 * parallel
