"""ppm_to_layers --resume: a render killed (SIGKILL), interrupted (Ctrl-C) or stopped (SIGTERM) continues from
the bands on the disk, and writes the files an uninterrupted render writes, byte for byte.

The renders are of the synthetic scroll (converted by scroll_to_ome) along a
long .ppm, slowed down with tiles of 2 pixels on one thread so that a test can
stop them half-way; the record of the bands done is read by the test to stop
a render only once it has written some.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scrollzarr.ppm import write_ppm
from scrollzarr.synthetic import sheet_surface, write_stack

from conftest import ROOT, assert_ok, assert_one_line_error, run_script, scroll_to_ome

SHAPE = (40, 96, 112)
RECORD = ".scrollzarr-render.json"
SLOW = ["--workers", "1", "--block_size", "2", "--number_of_layers", "5"]


@pytest.fixture(scope="module")
def scroll(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_stack(root / "tiffs", SHAPE)
    assert_ok(scroll_to_ome(root / "tiffs", root / "scroll.zarr", "--chunk_size", 32, "--nlevels", 1, "--quiet"))
    write_ppm(root / "long.ppm", long_surface())
    return root


def long_surface() -> np.ndarray:
    """480 rows along the sheet, 300 pixels wide, with an unmapped hole (so that bands' counts differ)."""
    surface = sheet_surface(SHAPE, np.tile(np.arange(SHAPE[0], dtype=np.float64), 12), 300)
    surface[100:140, 50:120] = 0
    return surface


@pytest.fixture(scope="module")
def uninterrupted(scroll) -> dict[str, bytes]:
    out = scroll / "whole"
    assert_ok(ppm_to_layers(scroll, out, "--quiet"))
    return outputs(out)


def ppm_to_layers(scroll: Path, out: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return run_script(
        "ppm_to_layers.py", scroll / "long.ppm", scroll / "scroll.zarr", out / "l", out / "s.tif", *SLOW, *args
    )


def outputs(out: Path) -> dict[str, bytes]:
    """The layer TIFFs and the stacked image, by name (not the run's record of them)."""
    files = {path.name: path.read_bytes() for path in sorted((out / "l").glob("*.tif"))}
    return files | {"s.tif": (out / "s.tif").read_bytes()}


def start(scroll: Path, out: Path) -> subprocess.Popen[str]:
    command = [sys.executable, ROOT / "ppm_to_layers.py", scroll / "long.ppm", scroll / "scroll.zarr"]
    command += [out / "l", out / "s.tif", *SLOW]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(list(map(str, command)), stderr=subprocess.PIPE, text=True, env=env)


def wait_for_bands(process: subprocess.Popen[str], out: Path, count: int = 2) -> dict:
    """Wait until the render's record lists ``count`` bands done; its content then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the render ended before it could be stopped; make it longer"
        try:
            record = json.loads((out / "l" / RECORD).read_text())
        except (FileNotFoundError, ValueError):
            record = {"done": {}}
        if len(record["done"]) >= count:
            return record
        time.sleep(0.05)
    raise AssertionError("no band was recorded in two minutes")


def assert_nothing_looks_finished(out: Path) -> None:
    assert sorted(p.name for p in (out / "l").glob("*.tif")) == []
    assert not (out / "s.tif").exists()
    assert (out / "l" / ".00.tif.partial").exists() and (out / ".s.tif.partial").exists()


def test_a_killed_render_resumed_writes_the_uninterrupted_renders_files(scroll, uninterrupted, tmp_path):
    process = start(scroll, tmp_path)
    record = wait_for_bands(process, tmp_path)
    process.kill()
    process.wait()
    assert_nothing_looks_finished(tmp_path)
    done = len(record["done"])

    refused = ppm_to_layers(scroll, tmp_path)  # without --resume: told what to do
    assert_one_line_error(refused, "holds a render that stopped", "--resume", "--overwrite", code=1)

    # A kill while the record was being rewritten leaves its temporary file: the next run removes it.
    leftover = tmp_path / "l" / f"{RECORD}.{'0' * 32}.partial"
    leftover.write_text("{")
    result = ppm_to_layers(scroll, tmp_path, "--resume")
    assert_ok(result)
    assert not leftover.exists()
    resumed = int(result.stderr.split("resumed: ")[1].split()[0])
    assert resumed >= done  # at least the bands recorded before the kill
    assert outputs(tmp_path) == uninterrupted
    assert not (tmp_path / "l" / RECORD).exists()
    assert [p.name for p in (tmp_path / "l").iterdir() if p.name.startswith(".")] == [".scrollzarr-layers.json"]
    mapped = int(np.any(long_surface()[..., 3:] != 0, axis=-1).sum())
    assert f"{mapped} of {480 * 300} pixels mapped" in result.stderr  # every band's pixels, resumed or not


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_render_keeps_its_bands_and_says_how_to_continue(scroll, uninterrupted, tmp_path, stop):
    process = start(scroll, tmp_path)
    wait_for_bands(process, tmp_path)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + stop, stderr
    assert "Traceback" not in stderr
    assert "interrupted; to continue: " in stderr and stderr.rstrip().endswith("--resume"), stderr
    assert_nothing_looks_finished(tmp_path)
    record = json.loads((tmp_path / "l" / RECORD).read_text())
    assert record["done"], "the bands done before the signal were not recorded"
    command = stderr.split("to continue: ")[1].strip()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, timeout=600)
    assert_ok(result)
    assert f"resumed: {len(record['done'])} band(s)" in result.stderr
    assert outputs(tmp_path) == uninterrupted


def test_overwrite_starts_a_stopped_render_again(scroll, uninterrupted, tmp_path):
    process = start(scroll, tmp_path)
    wait_for_bands(process, tmp_path)
    process.kill()
    process.wait()
    assert_ok(ppm_to_layers(scroll, tmp_path, "--overwrite", "--quiet"))
    assert outputs(tmp_path) == uninterrupted
    assert sorted(p.name for p in (tmp_path / "l").iterdir() if p.name.startswith(".")) == [".scrollzarr-layers.json"]
    assert not (tmp_path / ".s.tif.partial").exists()


def test_resume_with_nothing_to_resume_is_one_line(scroll, tmp_path):
    result = ppm_to_layers(scroll, tmp_path, "--resume")
    assert_one_line_error(result, "--resume", "holds no stopped render", "render without --resume", code=2)
    both = ppm_to_layers(scroll, tmp_path, "--resume", "--overwrite")
    assert_one_line_error(both, "--resume continues a stopped render, --overwrite starts again", code=2)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--number_of_layers", "7"], "layers 5, this one 7"),
        (["--layer_spacing", "2"], "spacing 1.0, this one 2.0"),
        (["--stack_filter", "mean"], 'stack filter "max", this one "mean"'),
        (["--direction", "positive"], 'direction "both", this one "positive"'),
    ],
)
def test_resume_of_another_render_is_refused_naming_the_difference(scroll, tmp_path, change, named):
    process = start(scroll, tmp_path)
    wait_for_bands(process, tmp_path, 1)
    process.kill()
    process.wait()
    result = ppm_to_layers(scroll, tmp_path, "--resume", *change)
    assert_one_line_error(result, "--resume: the render stopped in", named, "or render again with --overwrite", code=1)
    assert_nothing_looks_finished(tmp_path)  # nothing of the stopped render was lost


def test_resume_after_the_surface_changed_is_refused(scroll, tmp_path):
    surface_copy = tmp_path / "copy"
    surface_copy.mkdir()
    (surface_copy / "long.ppm").write_bytes((scroll / "long.ppm").read_bytes())
    (surface_copy / "scroll.zarr").symlink_to(scroll / "scroll.zarr")
    process = start(surface_copy, tmp_path)
    wait_for_bands(process, tmp_path, 1)
    process.kill()
    process.wait()
    os.utime(surface_copy / "long.ppm", ns=(0, 0))  # touched: it may have been rewritten since
    result = ppm_to_layers(surface_copy, tmp_path, "--resume")
    assert_one_line_error(result, "surface files (size, time)", code=1)


def test_a_render_stopped_with_relative_paths_is_resumed_from_another_folder(scroll, uninterrupted, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "long.ppm").symlink_to(scroll / "long.ppm")
    (work / "scroll.zarr").symlink_to(scroll / "scroll.zarr")
    command = [sys.executable, ROOT / "ppm_to_layers.py", "long.ppm", "scroll.zarr", "out/l", "out/s.tif", *SLOW]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(list(map(str, command)), stderr=subprocess.PIPE, text=True, env=env, cwd=work)
    wait_for_bands(process, work / "out", 1)
    process.kill()
    process.wait()
    result = ppm_to_layers(work, work / "out", "--resume")  # absolute paths, from the tests' folder
    assert_ok(result)
    assert outputs(work / "out") == uninterrupted
