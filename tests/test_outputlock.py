"""The output lock: a second holder is refused while the first lives, and the kernel frees it when a holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scrollzarr.outputlock import LOCK_NAME, LockedError, OutputLock

from conftest import ROOT

HOLD = """
import sys, time
from pathlib import Path
from scrollzarr.outputlock import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_in_child(directory: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_second_holder_is_refused_until_the_first_is_killed(tmp_path):
    out = tmp_path / "out.zarr"
    child = hold_in_child(out)
    try:
        expected = pytest.raises(LockedError, match="another run is writing the output store")
        with expected, OutputLock(out, "output store"):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # kill -9 released it: the lock file is still there, and it is taken again
    assert (out / LOCK_NAME).exists()
    with OutputLock(out):
        assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()


def test_the_lock_creates_missing_directories_and_removes_them_if_left_empty(tmp_path):
    out = tmp_path / "a" / "b" / "out.zarr"
    with OutputLock(out):
        assert out.is_dir()
    assert not (tmp_path / "a").exists()
    with OutputLock(out):
        (out / "kept").write_text("x")
    assert (out / "kept").exists() and not (out / LOCK_NAME).exists()


def test_a_refused_run_removes_the_directories_it_created(tmp_path):
    out = tmp_path / "out.zarr"
    child = hold_in_child(out)
    try:
        other = tmp_path / "out.zarr"
        with pytest.raises(LockedError), OutputLock(other):
            pass
        assert out.is_dir(), "the holder's directory was not created by the refused run and must stay"
    finally:
        child.kill()
        child.wait()


def test_holders_that_follow_each_other_never_overlap(tmp_path):
    """Many processes take the lock in turn while each removes the file on release: never two at once."""
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "log"
    script = f"""
import os, sys, time
from pathlib import Path
from scrollzarr.outputlock import OutputLock, LockedError
done = 0
deadline = time.monotonic() + 3
while done < 20 and time.monotonic() < deadline:
    try:
        with OutputLock(Path({str(out)!r})):
            with open({str(log)!r}, "a") as f:
                f.write(f"in {{os.getpid()}}\\n"); f.flush(); time.sleep(0.002); f.write(f"out {{os.getpid()}}\\n")
            done += 1
    except LockedError:
        time.sleep(0.001)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    children = [subprocess.Popen([sys.executable, "-c", script], env=env) for _ in range(4)]
    started = time.monotonic()
    for child in children:
        assert child.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    assert len(lines) >= 8, f"too few turns in {time.monotonic() - started:.1f} s"
    for first, second in zip(lines[::2], lines[1::2], strict=True):
        assert first.startswith("in ") and second == "out " + first[3:], lines
