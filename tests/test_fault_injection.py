"""A run stopped at every point where it changes its output still ends, once resumed, in the very bytes
of an uninterrupted run; and what it left under a final name is never wrong.

The real script runs in a child process under a small wrapper (``WRAPPER``, no hooks in the
package): it counts every change the process makes under the output directory (files opened for
writing, ``os.write``/``os.pwrite``, renames and replaces, hard links, removals, new directories,
truncations), through Python's audit events and by patching ``os.write`` and ``os.pwrite``, and at
change N (``FAULT_AT``) ends the process with ``os._exit(9)``, as ``kill -9`` or a power cut would:
before a rename, removal or open happens, or half-way through a write (half the bytes written).
A first run lists the changes; then the run is stopped at each N in turn and recovered the way the
tools tell the user to: ``--resume`` (scroll_to_ome), the same command again with ``--overwrite``
(ppm_to_layers).  Every failure is listed with its N and the change the process was about to make.
(zarr writes a few metadata files from several threads at once, so the N of such a change may differ
by a few between runs: a stop then falls on a neighbouring change, which is one of the run's all the same.)

Every file is written under a temporary ``*.partial`` name, and recovery deletes or rewrites those.
So a stop just after a temporary file was opened or written, before anything else, leaves what the
stop just before that open left, temporary files aside: such stops are not run again (see
:func:`distinct_stops`), except the stop half-way through a write (the torn write), which is.  That
halves the runs; each needs two processes (about a second together here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from scrollzarr import progress
from scrollzarr.outputlock import LOCK_NAME
from scrollzarr.ppm import write_ppm

from conftest import ROOT, assert_ok, read_json, run_script, scroll_to_ome, store_files, write_stack

WRAPPER = r"""
import importlib, json, os, re, sys, threading

AT = int(os.environ["FAULT_AT"])  # 0: only count
MATCH = os.environ.get("FAULT_MATCH")  # or stop at the first change whose description matches
ROOT = os.path.realpath(os.environ["FAULT_ROOT"])
REPORT = os.environ["FAULT_REPORT"]
lock = threading.Lock()
seen = []  # what each change was


def where(path, dir_fd=None):
    if isinstance(path, int):
        path = os.readlink(f"/proc/self/fd/{path}")
    path = os.fsdecode(os.fspath(path))
    if dir_fd not in (None, -1) and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.realpath(path)


def ours(path):
    return path == ROOT or path.startswith(ROOT + os.sep)


def change(what):
    # count one change; at change AT, say what it was and stop the process as kill -9 would
    with lock:
        seen.append(what)
        if len(seen) != AT and not (MATCH and re.fullmatch(MATCH, what)):
            return False
        with open(REPORT, "w") as report:
            report.write(what)
        return True


WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITING)
        targets = [where(path)] if writing else []
    elif event in ("os.rename", "os.link"):
        targets = [where(args[0], args[2]), where(args[1], args[3])]
    elif event in ("os.remove", "os.rmdir"):
        targets = [where(args[0], args[1])]
    elif event == "os.mkdir":
        targets = [where(args[0], args[2])]
        if os.path.isdir(targets[0]):
            return  # mkdir(exist_ok=True) of a directory that is there changes nothing
    elif event == "os.truncate":
        targets = [where(args[0])]
    else:
        return
    if targets and any(ours(t) for t in targets) and change(f"{event} {' -> '.join(targets)}"):
        os._exit(9)


def torn(name, original):
    def write(fd, data, *rest):
        path = where(fd)
        if ours(path) and change(f"os.{name} of {len(memoryview(data).cast('B'))} bytes to {path}"):
            half = memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2]
            if len(half):
                original(fd, half, *rest)
            os._exit(9)
        return original(fd, data, *rest)
    return write


os.write = torn("write", os.write)
os.pwrite = torn("pwrite", os.pwrite)
sys.addaudithook(hook)
script = sys.argv[1]
sys.argv = [str(os.path.join(os.environ["PYTHONPATH"], script + ".py")), *sys.argv[2:]]
code = importlib.import_module(script).main(sys.argv[1:])
if AT == 0:
    with open(REPORT, "w") as report:
        json.dump(seen, report)
sys.exit(code)
"""


def differing(after: dict[str, bytes], reference: dict[str, bytes]) -> list[str]:
    """The files, by relative path, that are in one of two file sets and not the same in the other."""
    return sorted(name for name in after.keys() | reference.keys() if after.get(name) != reference.get(name))


def left_behind(directory: Path) -> dict[str, bytes]:
    """:func:`store_files` of what a stopped run left, but for the lock file a killed run cannot remove (the
    kernel frees the lock itself; the next run takes it over and removes the file when it ends)."""
    return {name: data for name, data in store_files(directory).items() if Path(name).name != LOCK_NAME}


def stopped_run(script: str, args: list[object], root: Path, at: int, match: str = "") -> tuple[int, str]:
    """Run ``script`` under the wrapper, stopped at change ``at`` (0: not stopped) under ``root``, or at the
    first change whose description matches the regular expression ``match``.

    Returns the exit code and, stopped, the change it was about to make (not stopped: the JSON list of changes).
    """
    report = root.parent / f"{root.name}.fault"
    report.unlink(missing_ok=True)
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1",
        FAULT_AT=str(at), FAULT_MATCH=match, FAULT_ROOT=str(root), FAULT_REPORT=str(report),
    )  # fmt: skip
    command = [sys.executable, "-c", WRAPPER, script, *map(str, args), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode in (0, 9), f"exit {done.returncode}\n{done.stderr}"
    return done.returncode, report.read_text() if report.exists() else ""


def count_changes(script: str, args: list[object], root: Path) -> int:
    return len(changes(script, args, root))


def changes(script: str, args: list[object], root: Path) -> list[str]:
    """What an uninterrupted run under the wrapper changes under ``root``, in order."""
    code, seen = stopped_run(script, args, root, 0)
    assert code == 0
    return json.loads(seen)


def distinct_stops(seen: list[str]) -> list[int]:
    """The stops (1-based N) that leave distinct states, temporary files aside (see the module's docstring)."""

    def temporary(what: str) -> bool:
        return what.split()[0] in ("open", "os.write", "os.pwrite") and what.endswith(".partial")

    return [
        n
        for n in range(1, len(seen) + 1)
        if n == 1 or not temporary(seen[n - 2]) or seen[n - 1].split()[0] in ("os.write", "os.pwrite")
    ]


def sweep(points: list[int] | range, stop_and_recover: Callable[[int], str | None]) -> None:
    """Stop a run at each of ``points`` and recover; fail listing every N whose check failed."""
    failures = [f"N={n}: {problem}" for n in points if (problem := stop_and_recover(n)) is not None]
    assert not failures, f"{len(failures)} of {len(points)} stops failed:\n" + "\n".join(failures)


def wrong_final_files(left: dict[str, bytes], reference: dict[str, bytes], unfinished: set[str]) -> list[str]:
    """Files a stopped run left under a final name that differ from the uninterrupted run's.

    ``unfinished``: names that legitimately differ while a run is under way (the root ``.zattrs``
    without ``multiscales``, the progress record).  ``*.partial`` files are temporary by name.
    """
    return [
        name
        for name, data in left.items()
        if not name.endswith(".partial") and name not in unfinished and reference.get(name) != data
    ]


def marked_both_ways(left: dict[str, bytes], whole: list[dict[str, bytes]]) -> str | None:
    """A stopped run may leave the progress record beside ``multiscales`` in the root ``.zattrs`` (it saves the
    record before it removes them, and writes them before it removes the record) only while the store is one
    of the ``whole`` stores, record and slice list aside: ``None`` if so, else what is wrong."""
    try:
        attributes = json.loads(left.get(".zattrs", b"{}"))
    except ValueError:
        return None
    if progress.KEY not in left or "multiscales" not in attributes:
        return None
    rest = {name: data for name, data in left.items() if name not in UNFINISHED - {".zattrs"}}
    if any(rest == store for store in whole):
        return None
    return "the progress record and multiscales are both there, yet the store is not whole: readers take it as finished"


def brief(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    return f"exit {result.returncode}: {lines[-1] if lines else ''}"


# --- scroll_to_ome: a conversion ------------------------------------------------------------------------

CONVERT = ["--chunk_size", 8, "--nlevels", 2]
# Files of a store that differ, or are there only, while it is unfinished: the root .zattrs (no multiscales
# yet), the progress record and the list of slice files --resume checks the input against.
UNFINISHED = {".zattrs", progress.KEY, "scrollzarr_slices.json"}


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory) -> Path:
    """2 slabs of 2 x 2 chunks, one all zero; level 1 streamed (or read back under --max_gb)."""
    directory = tmp_path_factory.mktemp("fault") / "slices"
    volume = np.random.default_rng(5).integers(1, 65535, size=(12, 12, 16), dtype=np.uint16)
    volume[:8, :8] = 0
    write_stack(directory, volume)
    return directory


def unfinished_conversion(out: Path) -> bool:
    return (out / progress.KEY).exists()


def recover_conversion(stack: Path, out: Path, args: list[object], reference: dict[str, bytes]) -> str | None:
    """Check what a stopped conversion left and continue it as the tool says; ``None`` if all is well."""
    left = left_behind(out) if out.exists() else {}
    wrong = wrong_final_files(left, reference, UNFINISHED)
    if wrong:
        return f"left files under their final names that differ from the uninterrupted run's: {wrong[:5]}"
    marked = marked_both_ways({k: v for k, v in left.items() if not k.endswith(".partial")}, [reference])
    if marked:
        return marked
    if unfinished_conversion(out):
        result = scroll_to_ome(stack, out, *args, "--resume", "--quiet")
    elif (out / ".zattrs").exists() and "multiscales" in read_json(out / ".zattrs"):
        return None if left == reference else "no progress record and multiscales, but not the finished store"
    else:  # stopped before the first record: nothing is recorded, so the tool asks for a fresh start
        result = scroll_to_ome(stack, out, *args, "--overwrite", "--quiet")
    if result.returncode != 0:
        return f"recovery failed, {brief(result)}"
    after = store_files(out)
    if after != reference:
        return f"the recovered store differs from the uninterrupted run's in {differing(after, reference)[:5]}"
    return None


@pytest.mark.parametrize(
    "extra",
    [
        ["--workers", 1],  # level 1 streamed with level 0
        ["--workers", 1, "--max_gb", 0.00002],  # bands of half the plane; level 1 built from the stored level 0
    ],
    ids=["streamed", "read-back"],
)
def test_a_conversion_stopped_at_every_change_resumes_to_the_same_bytes(tiny_stack, tmp_path, extra):
    args = [*CONVERT, *extra]
    expected = tmp_path / "expected" / "out.zarr"
    if "--max_gb" in extra:  # the case it stands for
        plan = scroll_to_ome(tiny_stack, expected, *args, "--dry_run")
        assert "level 1 from the stored level above" in plan.stdout, plan.stdout
    assert_ok(scroll_to_ome(tiny_stack, expected, *args, "--quiet"))
    reference = store_files(expected)
    out = tmp_path / "run" / "out.zarr"
    out.parent.mkdir()
    seen = changes("scroll_to_ome", [tiny_stack, out, *args], out)
    assert store_files(out) == reference  # the wrapper itself changes nothing
    assert len(seen) > 50

    def stop_and_recover(n: int) -> str | None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        _, what = stopped_run("scroll_to_ome", [tiny_stack, out, *args], out, n)
        problem = recover_conversion(tiny_stack, out, args, reference)
        return None if problem is None else f"stopped before {what or 'nothing (ran to the end)'}: {problem}"

    sweep(distinct_stops(seen), stop_and_recover)


def test_the_default_layout_stopped_at_changes_resumes_to_the_same_bytes(tiny_stack, tmp_path):
    """Worker threads and writer threads beside them (--workers 2): the order of the changes varies
    from run to run, so a stop at N falls anywhere near N; every fifth change, and the last ones."""
    args = [*CONVERT, "--workers", 2]
    expected = tmp_path / "expected" / "out.zarr"
    assert_ok(scroll_to_ome(tiny_stack, expected, *args, "--quiet"))
    reference = store_files(expected)
    out = tmp_path / "run" / "out.zarr"
    out.parent.mkdir()
    total = count_changes("scroll_to_ome", [tiny_stack, out, *args], out)

    def stop_and_recover(n: int) -> str | None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        _, what = stopped_run("scroll_to_ome", [tiny_stack, out, *args], out, n)
        problem = recover_conversion(tiny_stack, out, args, reference)
        return None if problem is None else f"stopped before {what or 'nothing'}: {problem}"

    sweep(range(1, total + 1, 5), stop_and_recover)
    sweep(range(max(total - 4, 1), total + 1), stop_and_recover)


# --- scroll_to_ome --first_new_level: a rebuild ---------------------------------------------------------


def test_a_rebuild_stopped_at_every_change_resumes_to_the_same_bytes(tiny_stack, tmp_path):
    """Level 1 rebuilt from level 0 of a finished one-level store; stopped, then the same
    command with --resume (a stop before the rebuild recorded anything leaves the store as it was:
    then the same command again)."""
    rebuild = ["--first_new_level", 1, "--nlevels", 2, "--workers", 1]
    base = tmp_path / "base" / "out.zarr"
    assert_ok(scroll_to_ome(tiny_stack, base, "--chunk_size", 8, "--nlevels", 1, "--quiet"))
    before = store_files(base)
    expected = tmp_path / "expected" / "out.zarr"
    shutil.copytree(base, expected)
    assert_ok(scroll_to_ome(tiny_stack, expected, *rebuild, "--quiet"))
    reference = store_files(expected)
    out = tmp_path / "run" / "out.zarr"
    out.parent.mkdir()

    def fresh() -> None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        shutil.copytree(base, out)

    fresh()
    seen = changes("scroll_to_ome", [tiny_stack, out, *rebuild], out)
    assert store_files(out) == reference

    def stop_and_recover(n: int) -> str | None:
        fresh()
        _, what = stopped_run("scroll_to_ome", [tiny_stack, out, *rebuild], out, n)
        problem = recover_rebuild(n)
        return None if problem is None else f"stopped before {what or 'nothing'}: {problem}"

    def recover_rebuild(n: int) -> str | None:
        left = left_behind(out)
        wrong = wrong_final_files(left, reference, UNFINISHED)
        if wrong:
            return f"left files under their final names that differ from the finished rebuild's: {wrong[:5]}"
        marked = marked_both_ways({k: v for k, v in left.items() if not k.endswith(".partial")}, [reference, before])
        if marked:
            return marked
        if unfinished_conversion(out):
            result = scroll_to_ome(tiny_stack, out, *rebuild, "--resume", "--quiet")
        elif left == reference:
            return None
        elif left == before:
            result = scroll_to_ome(tiny_stack, out, *rebuild, "--quiet")
        else:
            return "no progress record, yet the store is neither the one before nor the one after the rebuild"
        if result.returncode != 0:
            return f"recovery failed, {brief(result)}"
        after = store_files(out)
        if after != reference:
            return f"the recovered store differs from the finished rebuild's in {differing(after, reference)[:5]}"
        return None

    sweep(distinct_stops(seen), stop_and_recover)


# --- ppm_to_layers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_surface(tiny_stack, tmp_path_factory) -> tuple[Path, Path]:
    """A one-level store of the tiny stack and a 6 x 5 surface through it, with an unmapped pixel."""
    root = tmp_path_factory.mktemp("surface")
    store = root / "volume.zarr"
    assert_ok(scroll_to_ome(tiny_stack, store, "--chunk_size", 8, "--nlevels", 1, "--quiet"))
    surface = np.zeros((6, 5, 6))
    v, u = np.mgrid[0:6, 0:5]
    surface[..., 0] = 3.25 + u * 1.5  # x
    surface[..., 1] = 9.5  # y
    surface[..., 2] = 1.0 + v * 1.75  # z
    surface[..., 4] = 1.0  # normal along y
    surface[2, 3] = 0
    ppm = root / "surface.ppm"
    write_ppm(ppm, surface)
    return ppm, store


def images(directory: Path) -> dict[str, bytes]:
    """:func:`files`, but for the record a run keeps of its layer TIFFs (it holds their modification times)."""
    return {name: data for name, data in store_files(directory).items() if Path(name).name != ".scrollzarr-layers.json"}


def test_a_render_stopped_at_every_change_gives_the_same_files_when_run_again(tiny_surface, tmp_path):
    """Five layers and the stacked image; a band of two rows at a time, so that each file is written in parts."""
    ppm, store = tiny_surface
    options = ["--number_of_layers", 5, "--number_of_stacked_layers", 3, "--block_size", 2, "--workers", 1]
    expected = tmp_path / "expected"
    assert_ok(run_script("ppm_to_layers.py", ppm, store, expected / "layers", expected / "stack" / "s.tif", *options))
    reference = images(expected)
    assert len(reference) == 6
    out = tmp_path / "run"

    def render(*extra: object) -> list[object]:
        return [ppm, store, out / "layers", out / "stack" / "s.tif", *options, *extra]

    out.mkdir()
    seen = changes("ppm_to_layers", render(), out)
    assert images(out) == reference
    assert sum(what.startswith("os.pwrite") for what in seen) >= 6 * 3  # three bands of rows in each of six files

    def stop_and_recover(n: int) -> str | None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir()
        _, what = stopped_run("ppm_to_layers", render(), out, n)
        left = images(out)
        final = {name: data for name, data in left.items() if not Path(name).name.startswith(".")}
        wrong = [name for name, data in final.items() if reference.get(name) != data]
        if wrong:
            return f"stopped before {what}: files under their final names differ from the finished run's: {wrong[:5]}"
        result = run_script("ppm_to_layers.py", *render("--overwrite", "--quiet"))
        if result.returncode != 0:
            return f"stopped before {what}: running again with --overwrite failed, {brief(result)}"
        after = images(out)
        if after != reference:
            differ = differing(after, reference)[:5]
            return f"stopped before {what}: after running again the files differ from the finished run's: {differ}"
        return None

    sweep(distinct_stops(seen), stop_and_recover)


def test_the_wrapper_counts_and_stops(tiny_stack, tmp_path):
    """The wrapper sees the chunk writes and renames and stops where it is told: stopped at the first
    chunk's rename, the run leaves that chunk only as a *.partial file.  (zarr writes some metadata
    files from several threads at once, and two threads may both create a directory, so the N of a
    change varies by a few between runs: this stop is found by what the change is.)"""
    out = tmp_path / "out.zarr"
    args = [tiny_stack, out, *CONVERT, "--workers", 1]
    seen = changes("scroll_to_ome", args, out)
    kinds = {what.split()[0] for what in seen}
    assert {"open", "os.write", "os.rename", "os.mkdir", "os.remove"} <= kinds, kinds
    level0 = re.escape(str(out / "0"))
    chunk = rf"os\.rename {level0}/\S+\.partial -> {level0}/[0-9/]+"
    first = next(what for what in seen if re.fullmatch(chunk, what)).split(" -> ")[1]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    code, what = stopped_run("scroll_to_ome", args, out, 0, match=chunk)
    assert code == 9 and what.split(" -> ")[1] == first
    assert Path(what.split()[1]).exists() and not Path(first).exists()
    assert json.loads((out / progress.KEY).read_text())["slabs_done"] == 0
