"""scroll_to_ome's output side: one run per store, every instant resumable (conversion and
``--first_new_level``), flushed before recorded, damaged chunks named, honest debug lines."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from scrollzarr import progress
from scrollzarr.outputlock import LOCK_NAME

from conftest import (
    ROOT,
    assert_ok,
    assert_one_line_error,
    chunk_count,
    read_json,
    scroll_to_ome,
    store_files,
    write_stack,
)
from reference import pyramid

CHUNK = 16
ARGS = ["--chunk_size", CHUNK, "--nlevels", 3, "--workers", 1]
REBUILD = ["--first_new_level", 1, "--nlevels", 4, "--workers", 1]
RANGES = ["--ranges", "8:232,4:100,2:62"]  # a crop: the metadata has a translation to keep


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(11)
    data = rng.integers(1, 65535, size=(64, 96, 240), dtype=np.uint16)
    data[:16, :32] = 0  # chunks never written
    return data


@pytest.fixture(scope="module")
def stack(tmp_path_factory, volume) -> Path:
    directory = tmp_path_factory.mktemp("safety") / "slices"
    write_stack(directory, volume)
    return directory


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory, volume) -> dict[str, bytes]:
    """The files of an uninterrupted conversion, itself checked voxel for voxel."""
    out = tmp_path_factory.mktemp("reference") / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, *ARGS))
    group = zarr.open_group(str(out), mode="r")
    for level, expected in enumerate(pyramid(volume, 3)):
        np.testing.assert_array_equal(group[str(level)][...], expected)
    return store_files(out)


@pytest.fixture(scope="module")
def big_stack(tmp_path_factory) -> Path:
    """Enough chunks that a run lasts a few seconds, long enough to start another run against it."""
    directory = tmp_path_factory.mktemp("big") / "slices"
    rng = np.random.default_rng(7)
    write_stack(directory, rng.integers(1, 65535, size=(160, 256, 320), dtype=np.uint16))
    return directory


@pytest.fixture(scope="module")
def big_reference(big_stack, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("big_reference") / "out.zarr"
    assert_ok(scroll_to_ome(big_stack, out, *ARGS))
    return store_files(out)


def start(*args: object) -> subprocess.Popen[str]:
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_for(condition, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run finished before it could be caught"
        assert time.monotonic() < deadline
        time.sleep(0.002)


# A run of scroll_to_ome that dies (os._exit(9), as from kill -9) at its Nth rename: the moment a
# file (chunk, metadata, record) takes its final name; each rename's target is printed on stderr.
# Test-side only: the script is unchanged.
STOP_AT_RENAME = """
import os, sys
sys.path.insert(0, {root!r})
import scroll_to_ome
count = [0]
def stopping(original):
    def rename(*args, **kwargs):
        count[0] += 1
        if count[0] == {n}:
            os._exit(9)
        sys.stderr.write("renamed " + os.fspath(args[1]) + "\\n")
        return original(*args, **kwargs)
    return rename
os.replace, os.rename = stopping(os.replace), stopping(os.rename)
sys.exit(scroll_to_ome.main({argv!r}))
"""


def run_stopped_at_rename(n: int, *args: object) -> subprocess.CompletedProcess[str]:
    code = STOP_AT_RENAME.format(root=str(ROOT), n=n, argv=[str(a) for a in args])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


# --- item 6: the debug lines


def test_verbose_names_the_levels_streamed_and_says_when_there_are_none(stack, tmp_path):
    one = scroll_to_ome(stack, tmp_path / "one.zarr", "--chunk_size", CHUNK, "--nlevels", 1, "--verbose")
    assert_ok(one)
    assert "no other level streamed with it" in one.stderr
    assert "levels 1 to 0" not in one.stderr
    three = scroll_to_ome(stack, tmp_path / "three.zarr", *ARGS, "--verbose")
    assert_ok(three)
    assert "levels 1 to 2 streamed with it" in three.stderr
    two = scroll_to_ome(stack, tmp_path / "two.zarr", "--chunk_size", CHUNK, "--nlevels", 2, "--verbose")
    assert_ok(two)
    assert "level 1 streamed with it" in two.stderr


# --- item 1: one run per output


def test_a_second_run_with_overwrite_is_refused_while_the_first_writes(big_stack, big_reference, tmp_path):
    """The first run replaces a store too: emptying it must keep the directory and the lock."""
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(big_stack, out, *ARGS, "--algorithm", "max"))
    first = start(big_stack, out, *ARGS, "--overwrite")
    wait_for(lambda: (out / progress.KEY).exists() and chunk_count(out / "0") >= 20, first)
    second = scroll_to_ome(big_stack, out, *ARGS, "--overwrite")
    assert_one_line_error(second, "another run is writing the output store", str(out), code=1)
    assert_ok(finish(first))
    assert store_files(out) == big_reference


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_two_runs_started_together_never_mix(big_stack, big_reference, tmp_path, overwrite):
    """Whichever order the two take the lock in: each finishes whole or is refused in one line."""
    out = tmp_path / "out.zarr"
    results = [finish(process) for process in [start(big_stack, out, *ARGS, *overwrite) for _ in range(2)]]
    assert 0 in [result.returncode for result in results], [result.stderr for result in results]
    for result in results:
        if result.returncode:
            assert_one_line_error(result, code=1)
            assert "another run is writing the output store" in result.stderr or "already exists" in result.stderr
    if not overwrite:
        assert sorted(result.returncode for result in results) == [0, 1]
    assert store_files(out) == big_reference


def test_a_resume_is_refused_while_a_run_writes(big_stack, tmp_path):
    out = tmp_path / "out.zarr"
    first = start(big_stack, out, *ARGS)
    wait_for(lambda: chunk_count(out / "0") >= 20, first)
    second = scroll_to_ome(big_stack, out, *ARGS, "--resume")
    assert_one_line_error(second, "another run is writing the output store", code=1)
    first.kill()
    first.communicate()


def test_a_dry_run_takes_no_lock(big_stack, big_reference, tmp_path):
    fresh = tmp_path / "fresh.zarr"
    assert_ok(scroll_to_ome(big_stack, fresh, *ARGS, "--dry_run"))
    assert not fresh.exists()  # not even a lock file
    out = tmp_path / "out.zarr"
    first = start(big_stack, out, *ARGS)
    wait_for(lambda: chunk_count(out / "0") >= 20, first)
    plan = scroll_to_ome(big_stack, out, *ARGS, "--overwrite", "--dry_run")  # while the run holds the lock
    assert_ok(plan)
    assert "output:" in plan.stdout
    assert_ok(finish(first))
    assert store_files(out) == big_reference


# --- item 3: every instant of a conversion is resumable


@pytest.mark.parametrize("extra", [(), ("--zarr_only",)])
def test_a_stop_at_any_rename_before_the_first_chunks_resumes(stack, tmp_path, extra):
    """Kill at each of the first renames (record, group, level metadata, first chunks): --resume finishes."""
    expected = tmp_path / "expected" / "out.zarr"
    assert_ok(scroll_to_ome(stack, expected, *ARGS, *extra))
    for n in range(1, 16):
        out = tmp_path / str(n) / "out.zarr"
        stopped = run_stopped_at_rename(n, stack, out, *ARGS, *extra, "--quiet")
        assert stopped.returncode == 9, stopped.stderr
        resumed = scroll_to_ome(stack, out, *ARGS, *extra, "--resume")
        assert_ok(resumed)
        assert store_files(out) == store_files(expected), n


def test_a_new_run_on_a_store_stopped_before_any_chunk_points_to_resume(stack, tmp_path):
    out = tmp_path / "out.zarr"
    assert run_stopped_at_rename(3, stack, out, *ARGS).returncode == 9
    refused = scroll_to_ome(stack, out, *ARGS)
    assert_one_line_error(refused, "is an unfinished conversion", "--resume", code=1)


# --- item 2: --first_new_level marks the store unfinished first, and resumes


@pytest.fixture(scope="module")
def converted(stack, tmp_path_factory) -> Path:
    """A finished, cropped store of one level, to rebuild levels from."""
    out = tmp_path_factory.mktemp("converted") / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 2, *RANGES))
    return out


def copy_store(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return target


@pytest.fixture(scope="module")
def rebuilt(converted, stack, tmp_path_factory, volume) -> dict[str, bytes]:
    """The files of an uninterrupted rebuild, checked voxel for voxel, with the crop's translation."""
    out = copy_store(converted, tmp_path_factory.mktemp("rebuilt") / "out.zarr")
    assert_ok(scroll_to_ome(stack, out, *REBUILD))
    group = zarr.open_group(str(out), mode="r")
    for level, expected in enumerate(pyramid(volume[2:62, 4:100, 8:232], 4)):
        np.testing.assert_array_equal(group[str(level)][...], expected)
    datasets = read_json(out / ".zattrs")["multiscales"][0]["datasets"]
    assert datasets[3]["coordinateTransformations"][1] == {"type": "translation", "translation": [2, 4, 8]}
    assert not (out / progress.KEY).exists() and not (out / LOCK_NAME).exists()
    return store_files(out)


def test_a_rebuild_removes_the_old_multiscales_before_it_touches_a_level(converted, stack, tmp_path):
    """Stopped as the first level file is renamed: the record is there and the old multiscales gone."""
    trial = copy_store(converted, tmp_path / "trial" / "out.zarr")
    log = run_stopped_at_rename(0, stack, trial, *REBUILD, "--quiet").stderr.splitlines()
    renamed = [line.split(" ", 1)[1] for line in log if line.startswith("renamed ")]
    first_level_file = next(n for n, path in enumerate(renamed, 1) if Path(path).parent.name == "1")
    out = copy_store(converted, tmp_path / "out.zarr")
    assert run_stopped_at_rename(first_level_file, stack, out, *REBUILD).returncode == 9
    assert "multiscales" not in read_json(out / ".zattrs")
    assert (out / progress.KEY).exists()
    assert not (out / "1" / "0").exists()  # the old level 1 is gone, and no new chunk is there yet


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9, 14, 25, 40])
def test_a_rebuild_stopped_at_any_point_resumes_to_the_same_bytes(converted, stack, rebuilt, tmp_path, n):
    out = copy_store(converted, tmp_path / "out.zarr")
    stopped = run_stopped_at_rename(n, stack, out, *REBUILD, "--quiet")
    assert stopped.returncode == 9, stopped.stderr
    if (out / progress.KEY).exists():
        again = scroll_to_ome(stack, out, *REBUILD)
        assert_one_line_error(again, "is an unfinished rebuild", "--resume", code=1)
        assert_ok(scroll_to_ome(stack, out, *REBUILD, "--resume"))
    else:  # stopped before the record took its name: nothing was touched but the lock and a temporary file
        left = {name for name in store_files(out) if name == LOCK_NAME or name.endswith(".partial")}
        assert {name: data for name, data in store_files(out).items() if name not in left} == store_files(converted)
        assert_ok(scroll_to_ome(stack, out, *REBUILD))
    assert store_files(out) == rebuilt


def test_a_rebuild_killed_mid_level_resumes_to_the_same_bytes(converted, stack, rebuilt, tmp_path):
    out = copy_store(converted, tmp_path / "out.zarr")
    process = start(stack, out, *REBUILD)
    wait_for(lambda: chunk_count(out / "2") >= 1, process)  # the store had levels 0 and 1
    process.kill()
    process.communicate()
    assert "multiscales" not in read_json(out / ".zattrs")
    assert_ok(scroll_to_ome(stack, out, *REBUILD, "--resume"))
    assert store_files(out) == rebuilt


@pytest.mark.parametrize(
    ("change", "option"),
    [
        (["--first_new_level", "2"], "--first_new_level was 1"),
        (["--nlevels", "5"], "--nlevels was 4"),
        (["--algorithm", "max"], "--algorithm was 'mean'"),
        (["--chunk_size", "8"], "--chunk_size was 16"),
    ],
)
def test_resuming_a_rebuild_with_another_option_is_refused(converted, stack, tmp_path, change, option):
    out = copy_store(converted, tmp_path / "out.zarr")
    assert run_stopped_at_rename(9, stack, out, *REBUILD).returncode == 9
    (out / LOCK_NAME).unlink()  # the killed run's; a later run may remove it
    before = store_files(out)
    result = scroll_to_ome(stack, out, *REBUILD, *change, "--resume")
    assert_one_line_error(result, f"cannot resume {out}", option, code=2)
    assert store_files(out) == before


def test_nothing_to_resume_for_a_finished_rebuild(converted, stack, tmp_path):
    out = copy_store(converted, tmp_path / "out.zarr")
    result = scroll_to_ome(stack, out, *REBUILD, "--resume")
    assert_one_line_error(result, "nothing to resume", "run without --resume", code=1)


# --- item 4: what the record vouches for is on the disk before the record says so

TRACED = "syncfs,sync,fsync,fdatasync,rename,renameat,renameat2,link,linkat,unlink,unlinkat"
CALL = re.compile(r"^(\d+) +(\w+)\((.*)")
RESUMED = re.compile(r"^(\d+) +<\.\.\. (\w+) resumed>")


def traced_events(log: str) -> list[tuple[str, str]]:
    """(kind, path) in the order the calls completed: "sync" (syncfs, sync), "fsync", "named" (a file
    took its final name: the target of a rename or link) and "unlink"."""
    events, pending = [], {}
    for line in log.splitlines():
        if call := CALL.match(line):
            pid, name, rest = call.groups()
            if "<unfinished ...>" in rest:
                pending[pid] = (name, rest)
                continue
        elif resumed := RESUMED.match(line):
            pid = resumed.group(1)
            name, rest = pending.pop(pid)
            rest += line.split("resumed>", 1)[1]
        else:
            continue
        if re.search(r"= -1 ", rest):
            continue
        paths = re.findall(r'"([^"]*)"', rest)
        if name in ("syncfs", "sync"):
            events.append(("sync", ""))
        elif name in ("fsync", "fdatasync"):
            events.append(("fsync", ""))
        elif name.startswith(("rename", "link")):
            events.append(("named", paths[-1]))
        elif name.startswith("unlink"):
            events.append(("unlink", paths[-1]))
    return events


def strace(*args: object) -> list[tuple[str, str]]:
    program = shutil.which("strace")
    if program is None:
        if os.geteuid() == 0:
            pytest.fail("strace is not installed (running as root, as in CI, so the durability tests must run)")
        pytest.skip(f"strace is not installed (running as uid {os.geteuid()})")
    log = Path(str(args[1]) + ".trace")
    command = [program, "-f", "-qq", "-e", f"trace={TRACED}", "-o", str(log), sys.executable]
    result = subprocess.run(
        [*command, str(ROOT / "scroll_to_ome.py"), *map(str, args), "--quiet"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600,
    )  # fmt: skip
    assert_ok(result)
    return traced_events(log.read_text())


def assert_flushed_before_the_record(events: list[tuple[str, str]]) -> int:
    """Every record save and the record's removal come after a flush of all files named before them; the
    record itself is flushed before it is renamed and its directory after.  Returns the number of saves."""
    unflushed, saves, removals = False, 0, 0
    for index, (kind, path) in enumerate(events):
        record = Path(path).name == progress.KEY
        if kind == "sync":
            unflushed = False
        elif kind == "named" and not record:
            unflushed = True
        elif kind in ("named", "unlink") and record:
            assert not unflushed, f"the record is {'saved' if kind == 'named' else 'removed'} before a flush"
            assert events[index + 1][0] == "fsync", "the record's directory is not flushed after it"
            if kind == "named":
                assert events[index - 1][0] == "fsync", "the record's data is not flushed before its rename"
                saves += 1
            else:
                removals += 1
    assert removals == 1  # the store is finished, after its metadata was flushed
    return saves


@pytest.mark.parametrize("extra", [(), ("--max_gb", "0.0008")])
def test_chunks_and_metadata_are_flushed_before_the_record_vouches_for_them(stack, tmp_path, extra):
    events = strace(stack, tmp_path / "out.zarr", *ARGS, "--workers", 2, *extra)
    assert assert_flushed_before_the_record(events) >= 5  # one a slab at least


def test_a_rebuild_flushes_before_its_record_and_before_it_deletes_a_level(converted, stack, tmp_path):
    out = copy_store(converted, tmp_path / "out.zarr")
    events = strace(stack, out, *REBUILD)
    assert assert_flushed_before_the_record(events) >= 3
    # the old level 1 goes with shutil.rmtree, which unlinks by names relative to its directory
    first_delete = next(i for i, (kind, path) in enumerate(events) if kind == "unlink" and not path.startswith("/"))
    multiscales_removed = next(i for i, (kind, path) in enumerate(events) if path.endswith("/.zattrs"))
    assert multiscales_removed < first_delete
    assert "sync" in [kind for kind, _ in events[multiscales_removed:first_delete]]


# --- item 5: damaged chunks are named, and --resume writes them again


def renames_of_a_whole_run(*args: object) -> list[str]:
    log = run_stopped_at_rename(0, *args, "--quiet").stderr.splitlines()
    return [line.split(" ", 1)[1] for line in log if line.startswith("renamed ")]


def damage(path: Path) -> None:
    assert path.stat().st_size == CHUNK**3 * 2
    path.write_bytes(path.read_bytes()[:1000])  # as a power cut before the flush, or a disk fault, leaves it


def test_resume_writes_damaged_chunks_of_the_band_in_progress_again(stack, reference, tmp_path):
    out = tmp_path / "out.zarr"
    assert run_stopped_at_rename(250, stack, out, *ARGS, "--quiet").returncode == 9
    assert read_json(out / progress.KEY)["slabs_done"] >= 2  # chunk rows 0 of levels 0 and 1 are vouched for
    damage(out / "0" / "0" / "3" / "3")
    damage(out / "1" / "0" / "1" / "1")
    resumed = scroll_to_ome(stack, out, *ARGS, "--resume")
    assert_ok(resumed)
    assert (
        f"chunk file {out / '0' / '0' / '3' / '3'} is damaged (1000 bytes, not 8192); it is written again"
        in resumed.stderr
    )
    assert f"{out / '1' / '0' / '1' / '1'} is damaged" in resumed.stderr
    assert store_files(out) == reference


def test_resume_writes_damaged_chunks_of_finished_bands_and_read_back_levels_again(stack, tmp_path):
    extra = ["--max_gb", "0.0008"]
    assert "from the stored level above" in scroll_to_ome(stack, tmp_path / "p.zarr", *ARGS, *extra, "--dry_run").stdout
    expected = tmp_path / "expected" / "out.zarr"
    assert_ok(scroll_to_ome(stack, expected, *ARGS, *extra))
    out = tmp_path / "out.zarr"
    total = len(renames_of_a_whole_run(stack, tmp_path / "trial" / "out.zarr", *ARGS, *extra))
    assert run_stopped_at_rename(total - 1, stack, out, *ARGS, *extra, "--quiet").returncode == 9
    record = read_json(out / progress.KEY)
    assert record["bands_done"] >= 2 and record["rows_done"]["2"] >= 1
    damage(out / "0" / "0" / "3" / "3")  # in the first band
    damage(out / "2" / "0" / "1" / "3")  # a read-back level
    resumed = scroll_to_ome(stack, out, *ARGS, *extra, "--resume")
    assert_ok(resumed)
    assert resumed.stderr.count("is damaged") == 2
    assert store_files(out) == store_files(expected)


@pytest.mark.parametrize(
    ("first", "level", "advice"),
    [
        (1, 0, "convert the TIFFs again with --overwrite"),
        (2, 1, "or rebuild it from level 0 with --first_new_level 1"),
    ],
)
def test_a_rebuild_names_a_damaged_chunk_of_the_level_it_reads(stack, tmp_path, first, level, advice):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 2))
    chunk = out / str(level) / "0" / ("3" if level == 0 else "1") / "3"
    damage(chunk)
    result = scroll_to_ome(stack, out, "--first_new_level", first, "--nlevels", 4)
    assert_one_line_error(result, f"chunk file {chunk} is damaged (1000 bytes, not 8192)", advice, code=1)


def test_a_resumed_rebuild_writes_damaged_chunks_of_its_new_levels_again(converted, stack, rebuilt, tmp_path):
    total = len(renames_of_a_whole_run(stack, copy_store(converted, tmp_path / "trial" / "out.zarr"), *REBUILD))
    out = copy_store(converted, tmp_path / "out.zarr")
    assert run_stopped_at_rename(total - 1, stack, out, *REBUILD, "--quiet").returncode == 9
    assert read_json(out / progress.KEY)["rows_done"]["1"] >= 1
    damage(out / "1" / "0" / "1" / "3")
    resumed = scroll_to_ome(stack, out, *REBUILD, "--resume")
    assert_ok(resumed)
    assert (
        f"chunk file {out / '1' / '0' / '1' / '3'} is damaged (1000 bytes, not 8192); it is written again"
        in resumed.stderr
    )
    assert store_files(out) == rebuilt


def test_a_run_killed_before_its_record_leaves_an_output_that_a_plain_run_takes(stack, reference, tmp_path):
    out = tmp_path / "out.zarr"
    assert run_stopped_at_rename(1, stack, out, *ARGS).returncode == 9  # the record's rename
    assert sorted(p.name == LOCK_NAME or p.name.endswith(".partial") for p in out.iterdir()) == [True, True]
    assert_ok(scroll_to_ome(stack, out, *ARGS))
    assert store_files(out) == reference
    empty = tmp_path / "second" / "out.zarr"  # the same name: it is in the metadata
    empty.mkdir(parents=True)
    (empty / LOCK_NAME).touch()  # killed before even the record's temporary file was made
    assert_ok(scroll_to_ome(stack, empty, *ARGS))
    assert store_files(empty) == reference
