"""The second review of ppm_to_layers, decompress_tiffs and the progress display: each case it found.

Every test runs the real scripts in child processes (tests/test_fault_injection.py's wrapper stops a
run as ``kill -9`` would) and compares with references computed here.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_fault_injection import changes, stopped_run, sweep
from test_layers_safety import strace

from scrollzarr import report
from scrollzarr.ppm import write_ppm

from conftest import ROOT, assert_ok, assert_one_line_error, run_script, write_stack

MANIFEST = ".scrollzarr-layers.json"


@pytest.fixture(scope="module")
def volume_store(tmp_path_factory):
    """A small one-level OME-Zarr and a 4 x 3 surface through it."""
    root = tmp_path_factory.mktemp("review")
    store = root / "v.zarr"
    data = np.random.default_rng(11).integers(1, 60000, size=(16, 20, 24), dtype=np.uint16)
    group = zarr.open_group(store, mode="w", zarr_format=2)
    group.create_array("0", data=data, chunks=(8, 8, 8), compressors=None)
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    rng = np.random.default_rng(3)
    points = rng.uniform((3, 3, 3), (21, 17, 13), size=(4, 3, 3))
    normals = rng.normal(size=(4, 3, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    ppm = root / "s.ppm"
    write_ppm(ppm, np.concatenate([points, normals], axis=-1))
    return ppm, store


# 4. --workers is bounded alike in the three tools.


@pytest.mark.parametrize("workers", [0, 1025])
def test_workers_out_of_bounds_is_the_same_message_in_the_three_tools(tmp_path, volume_store, workers):
    ppm, store = volume_store
    write_stack(tmp_path / "slices", np.ones((2, 4, 4), np.uint16))
    results = [
        run_script("ppm_to_layers.py", ppm, store, tmp_path / "layers", "--workers", workers),
        run_script("decompress_tiffs.py", tmp_path / "slices", tmp_path / "plain", "--workers", workers),
        run_script("scroll_to_ome.py", tmp_path / "slices", tmp_path / "s.zarr", "--workers", workers),
    ]
    bound = "at least 1, not 0" if workers == 0 else "at most 1024, not 1025"
    for result in results:
        assert_one_line_error(result, f"--workers must be {bound}", code=2)
    assert not (tmp_path / "layers").exists()


# 1. A run stopped while its TIFFs get their final names leaves a record that explains every file it wrote.


def test_a_render_stopped_at_or_after_its_renames_is_cleaned_up_by_the_next_overwrite(tmp_path, volume_store):
    """Run A: 8 layers, and the user's files beside them.  Run B (--overwrite, 6 layers of another size) is
    stopped at each change from its first rename on.  Run C (--overwrite, 3 layers) must leave exactly its
    own layers and the user's files, and warn about none of the files the tool wrote."""
    ppm, store = volume_store
    other = tmp_path / "other.ppm"
    rng = np.random.default_rng(8)
    points = rng.uniform((3, 3, 3), (21, 17, 13), size=(5, 4, 3))
    write_ppm(other, np.concatenate([points, np.tile([0.0, 0.0, 1.0], (5, 4, 1))], axis=-1))
    template = tmp_path / "template"
    assert_ok(run_script("ppm_to_layers.py", ppm, store, template, "--number_of_layers", 8, "--quiet"))
    (template / "notes.txt").write_text("mine")
    (template / ".notes").write_text("mine too")
    expected = tmp_path / "expected"
    assert_ok(run_script("ppm_to_layers.py", ppm, store, expected, "--number_of_layers", 3, "--quiet"))
    reference = {name: (expected / name).read_bytes() for name in ("00.tif", "01.tif", "02.tif")}
    out = tmp_path / "out"
    second = [other, store, out, "--number_of_layers", 6, "--overwrite", "--workers", 1]

    def fresh() -> None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        subprocess.run(["cp", "-a", str(template), str(out)], check=True)  # -a: the recorded times too

    fresh()
    seen = changes("ppm_to_layers", second, out)
    first_rename = next(i for i, what in enumerate(seen) if re.fullmatch(r"os\.rename \S+\.tif\.partial -> \S+", what))

    def stop_and_recover(n: int) -> str | None:
        fresh()
        _, what = stopped_run("ppm_to_layers", second, out, n)
        result = run_script("ppm_to_layers.py", ppm, store, out, "--number_of_layers", 3, "--overwrite")
        if result.returncode != 0:
            return f"stopped before {what or 'nothing'}: the next run failed: {result.stderr}"
        names = sorted(p.name for p in out.iterdir())
        if names != [".notes", MANIFEST, "00.tif", "01.tif", "02.tif", "notes.txt"]:
            return f"stopped before {what or 'nothing'}: the next run left {names}"
        if any((out / name).read_bytes() != data for name, data in reference.items()):
            return f"stopped before {what or 'nothing'}: the next run's layers differ from a clean run's"
        if "kept" in result.stderr:
            return f"stopped before {what or 'nothing'}: the next run warned: {result.stderr}"
        return None

    assert len(seen) - first_rename > 6  # the renames, the removals, the record
    sweep(range(first_rename + 1, len(seen) + 2), stop_and_recover)  # len(seen) + 1: not stopped


# 2, 3. Every record is flushed with its directory before the run goes on; every directory a run creates is
# flushed in its parent.


def traced(log: Path, *command: object) -> list[str]:
    """Run ``command`` under strace (file flushes, renames, writes at offsets, new directories); its calls."""
    trace = [
        strace(),
        "-f",
        "-y",
        "-qq",
        "-e",
        "trace=fsync,fdatasync,rename,renameat,renameat2,pwrite64,mkdir,mkdirat,openat",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(list(map(str, [*trace, "-o", log, *command])), capture_output=True, text=True, env=env)
    assert_ok(result)
    return log.read_text().splitlines()


def flushed(line: str) -> str | None:
    found = re.search(r"\bf(?:data)?sync\(\d+<([^>]*)>\)\s*=\s*0", line)
    return found.group(1) if found else None


def test_every_record_of_the_render_is_flushed_with_its_directory_before_the_render_goes_on(tmp_path, volume_store):
    """After a power cut, the record must list every hidden partial file that survived: it is written before
    they are created, and flushed with its directory before the run goes on, every time it is written."""
    ppm, store = volume_store
    out = tmp_path / "out"
    command = [sys.executable, ROOT / "ppm_to_layers.py", ppm, store, out, "--number_of_layers", 3, "--workers", 1]
    calls = traced(tmp_path / "trace", *command)
    record = re.compile(rf'rename(?:at2?)?\(.*"{re.escape(str(out / MANIFEST))}"')
    directory = re.escape(str(out))
    tiffs = re.compile(  # a TIFF created, written or renamed
        rf'openat\(.*"{directory}/\.\d+\.tif\.partial", [^)]*O_CREAT|pwrite64\(\d+<{directory}/|rename.*\.tif\.partial'
    )
    renames = [i for i, line in enumerate(calls) if record.search(line)]
    assert len(renames) >= 2 and all(not tiffs.search(line) for line in calls[: renames[0]])
    for i in renames:
        # the first of: the directory flushed, a pixel written, a TIFF renamed, the record written again
        after = (
            line for line in calls[i + 1 :] if flushed(line) == str(out) or tiffs.search(line) or record.search(line)
        )
        first = next(after, "the end of the run")
        assert flushed(first) == str(out), f"the record renamed by {calls[i]} is followed by {first}, not a flush"


@pytest.mark.parametrize("script", ["ppm_to_layers", "decompress_tiffs"])
def test_the_directories_a_run_creates_are_flushed_in_their_parents(tmp_path, volume_store, script):
    ppm, store = volume_store
    write_stack(tmp_path / "slices", np.ones((2, 4, 4), np.uint16), compression="zlib")
    out = tmp_path / "new" / "deeper" / "out"
    stack = tmp_path / "stacks" / "more" / "s.tif"
    if script == "ppm_to_layers":
        arguments = [ppm, store, out, stack, "--number_of_layers", 3]
    else:
        arguments = [tmp_path / "slices", out]
    calls = traced(tmp_path / "trace", sys.executable, ROOT / f"{script}.py", *arguments, "--workers", 1)
    made = {
        re.search(r'mkdir(?:at)?\(.*?"([^"]*)"', line).group(1)
        for line in calls
        if re.search(r"mkdir(at)?\(.*= 0$", line)
    }
    created = {out, out.parent, out.parent.parent}
    if script == "ppm_to_layers":
        created |= {stack.parent, stack.parent.parent}
    assert {Path(path) for path in made} >= created
    flushes = {flushed(line) for line in calls} - {None}
    missing = sorted(str(directory.parent) for directory in created if str(directory.parent) not in flushes)
    assert not missing, f"the parents of new directories never flushed: {missing}"


# 5. The progress display is updated from several threads at once.


def test_progress_lines_updated_from_eight_threads_are_those_of_one(monkeypatch, caplog):
    """A clock that lets another thread run while it is read (as any real one may): the lines logged must be
    those of the same updates made one after another, one a minute of the clock, none twice or lost."""
    ticks = itertools.count()

    def clock() -> float:
        time.sleep(0)  # let another thread run here
        return 60.0 / 8 * next(ticks)  # 8 updates a minute

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: lines, not the bar
    monkeypatch.setattr(report, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="scrollzarr")
    threads, updates = 8, 400
    total = threads * updates
    with report.progress(total, "px", "rendering", quiet=False) as bar:
        workers = [threading.Thread(target=lambda: [bar.update(1) for _ in range(updates)]) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    # One after another: update k reads the clock at k * 7.5 s, so every 8th logs a line, with k units done.
    expected = [f"rendering: {100 * (k / total):.1f} % done in" for k in range(8, total + 1, 8)]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected, strict=True))
