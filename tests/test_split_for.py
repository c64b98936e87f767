"""memory.split_for: a level's tasks cut smaller, in whole write units, until the cluster has work for every slot."""

from __future__ import annotations

import math

from scrollzarr.memory import split_for


def count(shape, block):
    return math.prod(-(-n // b) for n, b in zip(shape, block, strict=True))


def test_a_level_of_one_block_is_cut_in_halves_for_two_workers():
    assert split_for((128, 1024, 1024), (128, 1024, 1024), (128, 128, 128), 2) == (128, 512, 1024)
    assert split_for((128, 1024, 1024), (128, 1024, 1024), (128, 128, 128), 3) == (128, 384, 1024)
    # rows first; columns once the rows are one unit each
    assert split_for((128, 1024, 1024), (128, 1024, 1024), (128, 128, 128), 16) == (128, 128, 512)


def test_enough_blocks_already_or_nothing_left_to_cut_leave_the_block_as_it_is():
    assert split_for((256, 2048, 2048), (128, 2048, 2048), (128, 128, 128), 2) == (128, 2048, 2048)
    assert split_for((64, 100, 100), (64, 100, 100), (64, 128, 128), 8) == (64, 100, 100)


def test_any_cut_is_whole_units_no_larger_and_gives_the_slots_work_where_it_can(rng):
    for _ in range(500):
        unit = tuple(int(n) for n in rng.choice([16, 32, 64, 128], size=3))
        shape = tuple(int(n) for n in rng.integers(1, 3000, size=3))
        block = tuple(min(int(k) * u, n) for k, u, n in zip(rng.integers(1, 20, size=3), unit, shape, strict=True))
        parallel = int(rng.integers(1, 200))
        z, y, x = split_for(shape, block, unit, parallel)
        assert z == block[0] and y <= block[1] and x <= block[2]
        assert y == block[1] or y % unit[1] == 0
        assert x == block[2] or x % unit[2] == 0
        assert count(shape, (z, y, x)) >= min(parallel, count(shape, (z, min(unit[1], y), min(unit[2], x)))), (
            shape,
            block,
            unit,
            parallel,
            (z, y, x),
        )
        if count(shape, block) >= parallel:
            assert (y, x) == block[1:]
