"""The command lines under hostile conditions: absurd numbers, a stop before anything is written, pipes, --quiet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from conftest import ROOT, assert_one_line_error, scroll_to_ome, write_stack


def many_slices(directory: Path, count: int) -> None:
    """``count`` tiny slices (the same bytes under every name): a stack whose planning takes a while."""
    directory.mkdir()
    tifffile.imwrite(directory / "00000.tif", np.arange(64, dtype=np.uint16).reshape(8, 8))
    raw = (directory / "00000.tif").read_bytes()
    for z in range(1, count):
        (directory / f"{z:05d}.tif").write_bytes(raw)


def opened_in(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` has a file of ``directory`` open now."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{directory}/"):
                return True
        except FileNotFoundError:
            continue
    return False


def test_ctrl_c_while_planning_does_not_suggest_resume(tmp_path):
    source = tmp_path / "slices"
    many_slices(source, 8000)
    out = tmp_path / "out.zarr"
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(source), str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 60
    while not opened_in(process.pid, source):  # reading the headers: the plan, before anything is written
        assert process.poll() is None and time.monotonic() < deadline, "planning ended before it could be stopped"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert not out.exists(), "the run got past planning before the signal: the test proves nothing"
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "scroll_to_ome: interrupted", stderr
    assert "--resume" not in stderr


def test_an_output_that_cannot_be_created_does_not_suggest_resume(tmp_path, rng):
    source = tmp_path / "slices"
    write_stack(source, rng.integers(0, 60000, size=(4, 20, 30), dtype=np.uint16))
    (tmp_path / "file").write_text("x")
    result = scroll_to_ome(source, tmp_path / "file" / "out.zarr")
    assert_one_line_error(result, "out.zarr", code=1)
    assert "--resume" not in result.stderr and "continue" not in result.stderr
    assert (tmp_path / "file").read_text() == "x"
