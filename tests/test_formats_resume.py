"""Sharded and compressed stores keep every promise of the default one: a run killed anywhere resumes to the
very files of an uninterrupted run, --first_new_level keeps the layout (and resumes too), damage is found.

The runs are stopped as in tests/test_fault_injection.py (its wrapper ends the process as kill -9 would, at
a chosen change under the output: mid-write of a shard, before a progress record's rename, in a level read
back) and by a real SIGKILL as in tests/test_resume.py.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image as ImageV05
from test_fault_injection import (
    UNFINISHED,
    brief,
    changes,
    differing,
    distinct_stops,
    left_behind,
    stopped_run,
    sweep,
    wrong_final_files,
)
from test_resume import ARGS as RESUME_ARGS
from test_resume import reference, stack, start, wait_for  # noqa: F401 (its fixtures)

from scrollzarr import progress
from scrollzarr.outputlock import LOCK_NAME

from conftest import assert_ok, assert_one_line_error, chunk_count, read_json, scroll_to_ome, store_files, write_stack
from reference import pyramid

SHAPE = (20, 36, 40)  # z, y, x: two slabs and a half of 8 slices; edge shards on every axis
CHUNK = 8
BASE = ["--chunk_size", CHUNK, "--nlevels", 3, "--workers", 1]
FLAT = ["--zarr_format", 3, "--compressor", "blosc-zstd", "--shard_shape", "8,16,16"]
DEEP = ["--zarr_format", 3, "--compressor", "blosc-zstd", "--shard_shape", "16,16,16"]
# --max_gb 0.0001: level 0 in two bands of 32 rows, levels 1 and 2 from the stored level above in blocks
SMALL = ["--max_gb", 0.0001]


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    data = np.random.default_rng(5).integers(1, 65535, size=SHAPE, dtype=np.uint16)
    data[:8, :16] = 0  # whole shards of one chunk's depth, and inner chunks of the deep shards, all zero
    return data


@pytest.fixture(scope="module")
def slices(volume, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("formats-resume") / "slices"
    write_stack(directory, volume)
    return directory


def uninterrupted(slices: Path, root: Path, args: list[object]) -> dict[str, bytes]:
    out = root / "out.zarr"  # the same name as the stopped runs': it is in the metadata
    assert_ok(scroll_to_ome(slices, out, *args, "--quiet"))
    return store_files(out)


# zarr 3 keeps a group's attributes in its zarr.json: the root's has no multiscales while the run is unfinished
UNFINISHED_V3 = UNFINISHED | {"zarr.json"}


def has_multiscales(files: dict[str, bytes]) -> bool:
    try:
        return "multiscales" in json.loads(files.get("zarr.json", b"{}")).get("attributes", {}).get("ome", {})
    except ValueError:
        return False


def recover(slices: Path, out: Path, args: list[object], expected: dict[str, bytes]) -> str | None:
    """tests/test_fault_injection.py's recover_conversion for a zarr 3 store: check what a stopped run left,
    continue it as the tool says (--resume; --overwrite if nothing was recorded); ``None`` if all is well."""
    left = left_behind(out) if out.exists() else {}
    wrong = wrong_final_files(left, expected, UNFINISHED_V3)
    if wrong:
        return f"left files under their final names that differ from the uninterrupted run's: {wrong[:5]}"
    final = {name: data for name, data in left.items() if not name.endswith(".partial")}
    if progress.KEY in final and has_multiscales(final):
        rest = {name: data for name, data in final.items() if name not in UNFINISHED_V3}
        if rest != {name: data for name, data in expected.items() if name not in UNFINISHED_V3}:
            return "the progress record and multiscales are both there, yet the store is not whole"
    if (out / progress.KEY).exists():
        result = scroll_to_ome(slices, out, *args, "--resume", "--quiet")
    elif has_multiscales(final):
        return None if left == expected else "no progress record and multiscales, but not the finished store"
    else:
        result = scroll_to_ome(slices, out, *args, "--overwrite", "--quiet")
    if result.returncode != 0:
        return f"recovery failed, {brief(result)}"
    after = store_files(out)
    return None if after == expected else f"the recovered store differs in {differing(after, expected)[:5]}"


def sample(stops: list[int], seen: list[str], every: int) -> list[int]:
    """Every ``every``-th of ``stops``, and the first stop of each kind below, so that each is tried."""
    kinds = [
        r"os\.write .*/0/c/.*\.partial",  # half-way through writing a level-0 shard
        r"os\.rename .*/0/c/.*",  # a level-0 shard's rename into place
        rf"os\.rename .*{progress.KEY}\..*",  # the progress record's replacement, between two records
        r".* .*/1/c/.*",  # level 1
        r".* .*/2/c/.*",  # level 2
    ]
    chosen = set(stops[::every]) | {stops[-1]}
    for kind in kinds:
        chosen.add(next(n for n in range(1, len(seen) + 1) if re.fullmatch(kind, seen[n - 1])))
    return sorted(chosen)


@pytest.mark.parametrize(
    "layout",
    [[*FLAT, *SMALL], DEEP, [*DEEP, *SMALL]],
    ids=["flat-shards-bands-read-back", "deep-shards-streamed", "deep-shards-read-back"],
)
def test_a_sharded_compressed_run_stopped_anywhere_resumes_to_the_same_files(slices, tmp_path, layout):
    args = [*BASE, *layout]
    reference_files = uninterrupted(slices, tmp_path / "expected", args)
    out = tmp_path / "run" / "out.zarr"
    out.parent.mkdir()
    seen = changes("scroll_to_ome", [slices, out, *args], out)
    assert store_files(out) == reference_files

    def stop_and_recover(n: int) -> str | None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        _, what = stopped_run("scroll_to_ome", [slices, out, *args], out, n)
        problem = recover(slices, out, args, reference_files)
        return None if problem is None else f"stopped before {what or 'nothing (ran to the end)'}: {problem}"

    sweep(sample(distinct_stops(seen), seen, 20), stop_and_recover)


def test_a_sigkilled_sharded_run_resumes_to_the_same_files(stack, reference, tmp_path):  # noqa: F811
    """A real SIGKILL in the first pass (shards of one chunk's depth, 4 x 4 chunks wide, blosc-zstd)."""
    layout = ("--zarr_format", "3", "--compressor", "blosc-zstd", "--shard_shape", "16,64,64")
    out = tmp_path / "out.zarr"
    process = start(stack, out, *layout)
    wait_for(lambda: chunk_count(out / "0" / "c") >= 25, process)  # into the second slab of 16 slices (20 shards)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert (out / progress.KEY).exists()
    assert_ok(scroll_to_ome(stack, out, *RESUME_ARGS, *layout, "--resume", "--quiet"))
    assert store_files(out) == reference[layout]


# --- --resume with other options ----------------------------------------------------------------------------


def stopped(slices: Path, out: Path, args: list[object], record: int = 1) -> Path:
    """``out`` as a run left it when stopped (as kill -9 would) before its progress record number ``record``
    (from 0; -1: the last) replaced the one before."""
    out.parent.mkdir(parents=True, exist_ok=True)
    replaced = rf"os\.rename .*{progress.KEY}\..*"
    seen = changes("scroll_to_ome", [slices, out, *args], out)
    at = [n for n, what in enumerate(seen, start=1) if re.fullmatch(replaced, what)][record]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    code, _ = stopped_run("scroll_to_ome", [slices, out, *args], out, at)
    assert code == 9 and (out / progress.KEY).exists()
    (out / LOCK_NAME).unlink(missing_ok=True)  # the killed run's lock file (the next run would take it over)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--compressor", "gzip"], "--compressor was 'blosc-zstd' in the stopped run, now 'gzip'"),
        (["--clevel", "5"], "--clevel was 3 in the stopped run, now 5"),
        (["--shard_shape", "8,8,8"], "--shard_shape was [8, 16, 16] in the stopped run, now [8, 8, 8]"),
    ],
)
def test_resume_with_other_layout_options_is_refused(slices, tmp_path, change, message):
    out = stopped(slices, tmp_path / "run" / "out.zarr", [*BASE, *FLAT])
    before = store_files(out)
    result = scroll_to_ome(slices, out, *BASE, *FLAT, *change, "--resume")
    assert_one_line_error(result, f"cannot resume {out}", message, "resume with the options of the stopped run", code=2)
    assert store_files(out) == before


def test_resume_of_a_sharded_run_as_zarr_2_is_refused(slices, tmp_path):
    out = stopped(slices, tmp_path / "run" / "out.zarr", [*BASE, *FLAT])
    before = store_files(out)
    result = scroll_to_ome(slices, out, *BASE, "--compressor", "blosc-zstd", "--resume")
    assert_one_line_error(result, "--zarr_format was 3 in the stopped run, now 2", code=2)
    assert store_files(out) == before


LAYOUT_KEYS = ("zarr_format", "shard_shape", "compressor", "clevel", "window")


def test_a_run_stopped_by_the_previous_version_resumes(slices, tmp_path):
    """The record of scrollzarr before the layout options had none of their keys: it is a default run's."""
    reference_files = uninterrupted(slices, tmp_path / "expected", BASE)
    out = stopped(slices, tmp_path / "run" / "out.zarr", BASE)
    record = read_json(out / progress.KEY)
    assert set(LAYOUT_KEYS) <= set(record["fingerprint"])
    for key in LAYOUT_KEYS:
        del record["fingerprint"][key]
    (out / progress.KEY).write_text(json.dumps(record, indent=1))
    refused = scroll_to_ome(slices, out, *BASE, "--compressor", "zstd", "--resume")
    assert_one_line_error(refused, "--compressor was 'none' in the stopped run, now 'zstd'", code=2)
    assert_ok(scroll_to_ome(slices, out, *BASE, "--resume", "--quiet"))
    assert store_files(out) == reference_files


# --- --first_new_level on a sharded store ----------------------------------------------------------------------

REBUILD = ["--first_new_level", 1, "--nlevels", 3, "--workers", 1]


@pytest.fixture(scope="module")
def one_level(slices, tmp_path_factory) -> Path:
    """A finished zarr 3 store of level 0 alone, deep shards, blosc-zstd."""
    out = tmp_path_factory.mktemp("one-level") / "out.zarr"
    assert_ok(scroll_to_ome(slices, out, "--chunk_size", CHUNK, "--nlevels", 1, *DEEP, "--quiet"))
    return out


def test_first_new_level_keeps_the_layout(one_level, slices, volume, tmp_path):
    out = tmp_path / "out.zarr"
    shutil.copytree(one_level, out)
    assert_ok(scroll_to_ome(slices, out, *REBUILD, "--quiet"))
    level0 = zarr.open_array(out / "0", mode="r")
    expected = pyramid(volume, 3)
    for level in range(3):
        array = zarr.open_array(out / str(level), mode="r")
        assert array.metadata.to_dict()["codecs"] == level0.metadata.to_dict()["codecs"]
        assert array.chunks == (CHUNK,) * 3 and array.shards == (16, 16, 16)
        np.testing.assert_array_equal(array[...], expected[level])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageV05.from_zarr(zarr.open_group(out, mode="r"))
    datasets = read_json(out / "zarr.json")["attributes"]["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]


def test_a_sharded_rebuild_stopped_anywhere_resumes_to_the_same_files(one_level, slices, tmp_path):
    expected = tmp_path / "expected" / "out.zarr"
    shutil.copytree(one_level, expected)
    assert_ok(scroll_to_ome(expected.parent / "unused", expected, *REBUILD, "--quiet"))
    reference_files = store_files(expected)
    before = store_files(one_level)
    out = tmp_path / "run" / "out.zarr"

    def fresh() -> None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        shutil.copytree(one_level, out)

    fresh()
    seen = changes("scroll_to_ome", [slices, out, *REBUILD], out)
    assert store_files(out) == reference_files

    def stop_and_recover(n: int) -> str | None:
        fresh()
        _, what = stopped_run("scroll_to_ome", [slices, out, *REBUILD], out, n)
        left = left_behind(out)
        wrong = wrong_final_files(left, reference_files, UNFINISHED_V3)
        if wrong:
            return f"stopped before {what}: final files differ from the finished rebuild's: {wrong[:5]}"
        if (out / progress.KEY).exists():
            result = scroll_to_ome(slices, out, *REBUILD, "--resume", "--quiet")
        elif left == reference_files:
            return None
        elif left == before:
            result = scroll_to_ome(slices, out, *REBUILD, "--quiet")
        else:
            return f"stopped before {what}: no record, yet neither the store before nor after the rebuild"
        if result.returncode != 0:
            return f"stopped before {what}: recovery failed: {result.stderr.strip().splitlines()[-1:]}"
        after = store_files(out)
        return None if after == reference_files else f"stopped before {what}: {differing(after, reference_files)[:5]}"

    stops = distinct_stops(seen)
    sweep(sorted(set(stops[::10]) | {stops[-1]}), stop_and_recover)


# --- damage ------------------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    """A write cut off under the final name (a power cut before the file was flushed)."""
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def scramble(path: Path) -> None:
    """A disk fault: a run of bytes in the middle of the file inverted."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


DAMAGED_LAYOUTS = {
    "zarr3-flat-shards-blosc-zstd": [*FLAT, *SMALL],
    "zarr3-deep-shards-blosc-zstd": DEEP,
    "zarr3-gzip": ["--zarr_format", 3, "--compressor", "gzip", *SMALL],
    "zarr2-blosc-lz4": ["--compressor", "blosc-lz4"],
    "zarr2-zstd": ["--compressor", "zstd", *SMALL],
}


def first_unit(level: Path) -> Path:
    """The first unit file (chunk or shard) of a level directory, in the order of their names."""
    return sorted(p for p in level.rglob("*") if p.is_file() and p.name.isdigit())[0]


@pytest.mark.parametrize("kind", sorted(DAMAGED_LAYOUTS))
def test_resume_writes_a_truncated_unit_again(slices, tmp_path, kind):
    """A level-0 unit the progress record vouches for, cut short: --resume names it, writes it again and ends
    with the uninterrupted run's files."""
    args = [*BASE, *DAMAGED_LAYOUTS[kind]]
    expected = uninterrupted(slices, tmp_path / "expected", args)
    out = stopped(slices, tmp_path / "run" / "out.zarr", args, record=-1)
    damaged = first_unit(out / "0")
    truncate(damaged)
    result = scroll_to_ome(slices, out, *args, "--resume")
    assert_ok(result)
    assert f"chunk file {damaged} is damaged (" in result.stderr and "); it is written again" in result.stderr
    assert store_files(out) == expected


@pytest.mark.parametrize(
    "kind,damage",
    [("zarr3-gzip", scramble), ("zarr2-blosc-lz4", truncate), ("zarr3-deep-shards-blosc-zstd", truncate)],
)
def test_first_new_level_names_a_damaged_unit_in_one_line(slices, tmp_path, kind, damage):
    """(Scrambled bytes inside a blosc chunk are found only where blosc's compressor sees them: this volume's
    noise is stored as is, and blosc keeps no checksum.  Gzip has its CRC.)"""
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(slices, out, *BASE, *DAMAGED_LAYOUTS[kind], "--nlevels", 1, "--quiet"))
    damaged = first_unit(out / "0")
    damage(damaged)
    result = scroll_to_ome(slices, out, *REBUILD)
    assert_one_line_error(result, str(damaged), "is damaged", code=1)
