"""What a stopped --overwrite, conversion or --first_new_level rebuild leaves never looks finished unless it
is, and the command the tools point to always ends in the uninterrupted run's bytes.

The runs are stopped with the fault-injection wrapper of ``test_fault_injection`` (the real script in a
child process, ended with ``os._exit(9)`` before its Nth change to the output or the first one matching
a pattern).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_fault_injection import brief, changes, distinct_stops, left_behind, stopped_run, sweep
from test_output_safety import strace

from scrollzarr import progress
from scrollzarr.ppm import write_ppm

from conftest import ROOT, assert_ok, assert_one_line_error, run_script, scroll_to_ome, store_files, write_stack

CONVERT = ["--chunk_size", 8, "--nlevels", 2, "--workers", 1]
LAYOUTS = {"group": [], "zarr_only": ["--zarr_only"]}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> tuple[Path, Path]:
    """Two different stacks of 2 slabs of 2 x 2 chunks (8^3), one chunk all zero: the old store's and the new."""
    root = tmp_path_factory.mktemp("stacks")
    directories = []
    for seed in (7, 8):
        volume = np.random.default_rng(seed).integers(1, 65535, size=(12, 12, 16), dtype=np.uint16)
        volume[:8, :8] = 0
        write_stack(root / f"slices{seed}", volume)
        directories.append(root / f"slices{seed}")
    return directories[0], directories[1]


def parses(path: Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` if there is none."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def looks_finished(out: Path, zarr_only: bool) -> bool:
    """Whether a reader would take ``out`` for a finished store: an OME-Zarr group with ``multiscales``, or
    (``--zarr_only``, which has no such mark) a zarr array without the progress record."""
    if zarr_only:
        return parses(out / ".zarray") is not None and not (out / progress.KEY).exists()
    return parses(out / ".zgroup") is not None and "multiscales" in (parses(out / ".zattrs") or {})


def final_files(left: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in left.items() if not name.endswith(".partial")}


def first_index(seen: list[str], pattern: str) -> int:
    """The 1-based N of the first change matching ``pattern``."""
    return next(n for n, what in enumerate(seen, start=1) if re.fullmatch(pattern, what))


def renamed_to(path: Path) -> str:
    return rf"os\.rename \S+\.partial -> {re.escape(str(path))}"


def reference(stack: Path, directory: Path, args: list[object]) -> dict[str, bytes]:
    out = directory / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, *args, "--quiet"))
    return store_files(out)


def differ(after: dict[str, bytes], expected: dict[str, bytes]) -> list[str]:
    return sorted(k for k in after.keys() | expected.keys() if after.get(k) != expected.get(k))[:5]


# --- item: --overwrite stopped while it empties the old store ---------------------------------------------


@pytest.mark.parametrize("old", ["finished", "unfinished"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_an_overwrite_stopped_at_every_change_never_looks_finished_and_overwrites_again(stacks, tmp_path, old, layout):
    """The store replaced is a finished one, or one stopped at its last chunk (its record vouches for the first
    of two slabs).  Every stop up to the new run's first record save (the rest is the conversion
    sweep of test_fault_injection): a store that looks finished is the old or the new one, byte for byte; a
    store with a record resumes to the run's bytes the record belongs to; what is neither is refused by
    --resume with one line; and --overwrite again gives the new store's bytes."""
    old_stack, new_stack = stacks
    args = [*CONVERT, *LAYOUTS[layout]]
    zarr_only = bool(LAYOUTS[layout])
    old_reference = reference(old_stack, tmp_path / "old", args)
    new_reference = reference(new_stack, tmp_path / "new", args)
    base = tmp_path / "base" / "out.zarr"
    base.parent.mkdir()
    if old == "finished":
        assert_ok(scroll_to_ome(old_stack, base, *args, "--quiet"))
    else:
        last_chunk = renamed_to(base / ("1/1/1" if zarr_only else "0/1/1/1"))  # of the second slab, level 0
        code, _ = stopped_run("scroll_to_ome", [old_stack, base, *args], base, 0, match=last_chunk)
        assert code == 9 and (base / progress.KEY).exists() and not looks_finished(base, zarr_only)
    out = tmp_path / "run" / "out.zarr"
    out.parent.mkdir()

    def fresh() -> None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        shutil.copytree(base, out)

    overwrite = [new_stack, out, *args, "--overwrite"]
    fresh()
    seen = changes("scroll_to_ome", overwrite, out)
    assert store_files(out) == new_reference
    last = first_index(seen, renamed_to(out / progress.KEY))

    def stop_and_recover(n: int) -> str | None:
        fresh()
        _, what = stopped_run("scroll_to_ome", overwrite, out, n)
        problem = check(n)
        return None if problem is None else f"stopped before {what or 'nothing'}: {problem}"

    def check(n: int) -> str | None:
        left = final_files(left_behind(out))
        if looks_finished(out, zarr_only) and left not in (old_reference, new_reference):
            return f"looks finished but is neither the old store nor the new one: {differ(left, new_reference)}"
        record = parses(out / progress.KEY)
        if record is not None:
            stack = Path(record["fingerprint"]["input_directory"])
            expected = old_reference if stack == old_stack.resolve() else new_reference
            result = scroll_to_ome(stack, out, *args, "--resume", "--quiet")
            if result.returncode != 0 or store_files(out) != expected:
                return f"--resume of the recorded run: {brief(result)}, differs in {differ(store_files(out), expected)}"
            fresh()
            stopped_run("scroll_to_ome", overwrite, out, n)
        elif not looks_finished(out, zarr_only):
            result = scroll_to_ome(new_stack, out, *args, "--resume")
            try:
                assert_one_line_error(result, "nothing to resume", "--overwrite", code=1)
            except AssertionError as error:
                return f"--resume of what is left is not refused in one line: {error}"
        result = scroll_to_ome(*overwrite, "--quiet")
        if result.returncode != 0:
            return f"--overwrite again failed, {brief(result)}"
        if store_files(out) != new_reference:
            return f"--overwrite again differs from the new store in {differ(store_files(out), new_reference)}"
        return None

    sweep([n for n in distinct_stops(seen) if n <= last], stop_and_recover)


# --- item: metadata that a power cut brought back empty ----------------------------------------------------


def killed_at_first_chunk(stack: Path, out: Path, args: list[object]) -> None:
    """A run stopped at its first chunk's rename, after the metadata was written (not yet flushed by it)."""
    chunk = rf"os\.rename \S+\.partial -> {re.escape(str(out))}/(0/)?[0-9]+/[0-9]+/[0-9]+"
    code, _ = stopped_run("scroll_to_ome", [stack, out, *args], out, 0, match=chunk)
    assert code == 9 and (out / progress.KEY).exists()


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_metadata_files_emptied_by_a_power_cut_are_written_again_by_resume(stacks, tmp_path, layout):
    """Each metadata file of a killed store in turn truncated to 0 bytes (as ext4 can bring back a file renamed
    but not flushed): --resume gives the uninterrupted run's bytes."""
    stack = stacks[0]
    args = [*CONVERT, *LAYOUTS[layout]]
    expected = reference(stack, tmp_path / "expected", args)
    killed = tmp_path / "killed" / "out.zarr"
    killed.parent.mkdir()
    killed_at_first_chunk(stack, killed, args)
    metadata = sorted(p.relative_to(killed) for p in killed.rglob(".z*"))
    assert len(metadata) == (2 if LAYOUTS[layout] else 6), metadata
    failures = []
    for name in metadata:
        out = tmp_path / str(name).replace("/", "_") / "out.zarr"
        shutil.copytree(killed, out)
        (out / name).write_bytes(b"")
        result = scroll_to_ome(stack, out, *args, "--resume", "--quiet")
        if result.returncode != 0 or store_files(out) != expected:
            failures.append(f"{name}: {brief(result)}, differs in {differ(store_files(out), expected)}")
    assert not failures, "\n".join(failures)


# --- items: a --first_new_level rebuild stopped, resumed and stopped again ---------------------------------

REBUILD = ["--first_new_level", 1, "--nlevels", 3, "--algorithm", "max", "--workers", 1]


@pytest.fixture
def three_levels(stacks, tmp_path) -> Path:
    """A finished store of 3 levels (mean) to rebuild levels 1 and 2 of (max)."""
    base = tmp_path / "base" / "out.zarr"
    assert_ok(scroll_to_ome(stacks[0], base, "--chunk_size", 8, "--nlevels", 3, "--workers", 1, "--quiet"))
    return base


def test_a_resumed_rebuild_removes_the_old_multiscales_before_it_deletes_a_level(stacks, three_levels, tmp_path):
    """Stopped as it removes multiscales (the record is saved, the old multiscales still there), then
    --resume stopped as it deletes the old level 1: the record is there, so multiscales must not be; and
    --resume then gives the uninterrupted rebuild's bytes."""
    expected_dir = tmp_path / "expected" / "out.zarr"
    shutil.copytree(three_levels, expected_dir)
    assert_ok(scroll_to_ome(stacks[0], expected_dir, *REBUILD, "--quiet"))
    expected = store_files(expected_dir)
    out = tmp_path / "run" / "out.zarr"
    shutil.copytree(three_levels, out)
    code, _ = stopped_run("scroll_to_ome", [stacks[0], out, *REBUILD], out, 0, match=renamed_to(out / ".zattrs"))
    assert code == 9 and (out / progress.KEY).exists()
    level1 = re.escape(str(out / "1"))
    code, what = stopped_run(
        "scroll_to_ome", [stacks[0], out, *REBUILD, "--resume"], out, 0, match=rf"os\.remove {level1}/.*"
    )
    assert code == 9, what
    assert (out / progress.KEY).exists()
    assert "multiscales" not in (parses(out / ".zattrs") or {}), "an unfinished rebuild looks finished"
    assert_ok(scroll_to_ome(stacks[0], out, *REBUILD, "--resume", "--quiet"))
    assert store_files(out) == expected


def test_resuming_an_unfinished_rebuild_as_a_conversion_names_the_rebuild_and_its_command(stacks, three_levels):
    out = three_levels
    code, _ = stopped_run(
        "scroll_to_ome", [stacks[0], out, *REBUILD], out, 0, match=rf"os\.remove {re.escape(str(out))}/1/.*"
    )
    assert code == 9
    for extra in (["--resume"], []):
        result = scroll_to_ome(stacks[0], out, "--chunk_size", 8, "--nlevels", 3, *extra)
        assert_one_line_error(result, "unfinished --first_new_level 1 rebuild", "--first_new_level 1 --resume", code=1)


def test_resuming_a_rebuild_of_a_finished_store_is_refused(stacks, three_levels):
    result = scroll_to_ome(stacks[0], three_levels, *REBUILD, "--resume")
    assert_one_line_error(result, "nothing to resume", "not an unfinished --first_new_level rebuild", code=1)


def test_a_run_killed_before_its_first_record_resumes_from_the_beginning(stacks, tmp_path):
    """Stopped at the first record's rename: the output holds the lock file and the record's temporary file;
    --resume starts from the beginning, saying so, and gives the uninterrupted run's bytes."""
    args = CONVERT
    expected = reference(stacks[0], tmp_path / "expected", args)
    out = tmp_path / "run" / "out.zarr"
    out.parent.mkdir()
    code, _ = stopped_run("scroll_to_ome", [stacks[0], out, *args], out, 0, match=renamed_to(out / progress.KEY))
    assert code == 9 and not (out / progress.KEY).exists()
    result = scroll_to_ome(stacks[0], out, *args, "--resume")
    assert_ok(result)
    assert "the stopped run wrote nothing; starting from the beginning" in result.stderr
    assert store_files(out) == expected


# --- item: ppm_to_layers meeting a chunk it cannot read -----------------------------------------------------


@pytest.fixture
def volume_and_surface(stacks, tmp_path) -> tuple[Path, Path]:
    """A finished one-level store of the first stack, and a 6 x 5 surface through its chunks."""
    store = tmp_path / "volume.zarr"
    assert_ok(scroll_to_ome(stacks[0], store, "--chunk_size", 8, "--nlevels", 1, "--quiet"))
    surface = np.zeros((6, 5, 6))
    v, u = np.mgrid[0:6, 0:5]
    surface[..., 0] = 3.25 + u * 2.5  # x
    surface[..., 1] = 9.5  # y
    surface[..., 2] = 1.0 + v * 1.75  # z
    surface[..., 4] = 1.0  # normal along y
    ppm = tmp_path / "surface.ppm"
    write_ppm(ppm, surface)
    return store, ppm


def test_a_chunk_of_the_wrong_size_is_damage_to_convert_again(volume_and_surface, tmp_path):
    store, ppm = volume_and_surface
    for chunk in (store / "0").glob("*/*/*"):
        with open(chunk, "r+b") as file:
            file.truncate(100)
    result = run_script("ppm_to_layers.py", ppm, store, tmp_path / "layers", "--number_of_layers", 3)
    assert_one_line_error(result, str(store / "0"), "damaged", "convert the volume again with scroll_to_ome", code=1)
    assert "--resume" not in result.stderr  # volume.py refuses unfinished stores: there is nothing to resume


def test_a_read_error_on_a_whole_chunk_is_not_called_damage(volume_and_surface, tmp_path):
    """EIO reading a chunk file (injected in the child, in zarr's reads and in the direct reads of raw chunk
    files): the disk's error, not a damaged store."""
    store, ppm = volume_and_surface
    patch = (
        "import builtins, errno, io, pathlib\n"
        "def chunk(path):\n"
        f"    return str(path).startswith({str(store / '0')!r} + '/') and pathlib.Path(path).name.isdigit()\n"
        "original = pathlib.Path.read_bytes\n"
        "def failing(self):\n"
        "    if chunk(self):\n"
        "        raise OSError(errno.EIO, 'Input/output error', str(self))\n"
        "    return original(self)\n"
        "pathlib.Path.read_bytes = failing\n"
        "class Failing(io.FileIO):\n"
        "    def readinto(self, buffer):\n"
        "        raise OSError(errno.EIO, 'Input/output error', self.name)\n"
        "opening = builtins.open\n"
        "def failing_open(file, mode='r', *args, **kwargs):\n"
        "    if isinstance(file, (str, pathlib.Path)) and chunk(file) and 'b' in mode:\n"
        "        return Failing(file, 'rb')\n"
        "    return opening(file, mode, *args, **kwargs)\n"
        "builtins.open = failing_open\n"
    )
    argv = [str(ROOT / "ppm_to_layers.py"), str(ppm), str(store), str(tmp_path / "layers"), "--number_of_layers", "3"]
    code = f"import runpy, sys\n{patch}sys.argv = {argv!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert_one_line_error(result, "Input/output error", code=1)
    assert "damaged" not in result.stderr


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_the_new_store_s_metadata_is_flushed_before_its_first_chunk(stacks, tmp_path, layout):
    """Under strace: a syncfs comes after the last metadata file of a new store took its name and before the
    first chunk file does (not only at the first checkpoint, a slab later)."""
    out = tmp_path / "out.zarr"
    events = strace(stacks[0], out, *CONVERT, *LAYOUTS[layout])
    named = [(i, Path(path)) for i, (kind, path) in enumerate(events) if kind == "named" and path.startswith(str(out))]
    first_chunk = next(i for i, path in named if path.name.isdigit())
    last_metadata = max(i for i, path in named if path.name in (".zarray", ".zattrs", ".zgroup") and i < first_chunk)
    assert any(kind == "sync" for kind, _ in events[last_metadata:first_chunk]), events[last_metadata:first_chunk]


@pytest.mark.parametrize("name", [".zarray", ".zattrs"])
def test_a_new_level_s_metadata_emptied_by_a_power_cut_is_written_again_by_a_resumed_rebuild(
    stacks, three_levels, tmp_path, name
):
    """Stopped at level 2's chunk, once level 1's row is recorded; level 1's metadata file emptied."""
    expected_dir = tmp_path / "expected" / "out.zarr"
    shutil.copytree(three_levels, expected_dir)
    assert_ok(scroll_to_ome(stacks[0], expected_dir, *REBUILD, "--quiet"))
    out = three_levels
    level2_chunk = renamed_to(out / "2") + "/[0-9]+/[0-9]+/[0-9]+"
    code, _ = stopped_run("scroll_to_ome", [stacks[0], out, *REBUILD], out, 0, match=level2_chunk)
    assert code == 9 and json.loads((out / progress.KEY).read_text())["rows_done"] == {"1": 1}
    (out / "1" / name).write_bytes(b"")
    result = scroll_to_ome(stacks[0], out, *REBUILD, "--resume", "--quiet")
    assert_ok(result)
    assert store_files(out) == store_files(expected_dir)


def test_resume_of_a_store_an_overwrite_was_emptying_says_so(stacks, tmp_path):
    """Stopped at the first level file --overwrite deletes (after the root metadata and the record)."""
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stacks[0], out, *CONVERT, "--quiet"))
    level = re.escape(str(out / "0"))
    code, _ = stopped_run(
        "scroll_to_ome", [stacks[1], out, *CONVERT, "--overwrite"], out, 0, match=rf"os\.remove {level}/.*"
    )
    assert code == 9 and not (out / progress.KEY).exists() and not (out / ".zgroup").exists()
    result = scroll_to_ome(stacks[1], out, *CONVERT, "--resume")
    assert_one_line_error(result, "nothing to resume", "stopped while it emptied it for --overwrite", code=1)
    assert_ok(scroll_to_ome(stacks[1], out, *CONVERT, "--overwrite", "--quiet"))
