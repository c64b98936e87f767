"""The command lines under hostile conditions: absurd numbers, a stop before anything is written, pipes, --quiet."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scrollzarr import report

from conftest import ROOT, assert_ok, assert_one_line_error, run_script, scroll_to_ome, write_stack


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


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--max_gb", "nan"], ["--max_gb must be a finite number of GB, not nan"]),
        (["--max_gb", "inf"], ["--max_gb must be a finite number of GB, not inf"]),
        (
            ["--max_gb", "1e300"],
            ["--max_gb must be at most 1048576 (1 PiB, more than any machine's memory), not 1e+300"],
        ),
        (["--max_gb", "1e-12"], ["--max_gb must be at least 9.54e-07 (1 KiB), not 1e-12; it is in GB"]),
        (["--chunk_size", "5000"], ["--chunk_size must be at most 1024, not 5000", "1024^3 uint16 voxels are 2 GiB"]),
        (["--nlevels", "100000"], ["--nlevels must be at most 32, not 100000", "after 31 halvings"]),
        (["--workers", "100000"], ["--workers must be at most 1024, not 100000"]),
    ],
)
def test_absurd_numbers_are_refused_with_the_reason(tmp_path, rng, args, fragments):
    source = tmp_path / "slices"
    write_stack(source, rng.integers(0, 60000, size=(4, 20, 30), dtype=np.uint16))
    for dry_run in ([], ["--dry_run"]):
        result = scroll_to_ome(source, tmp_path / "out.zarr", *args, *dry_run)
        assert_one_line_error(result, *fragments, code=2)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "out.zarr").exists()


def test_the_largest_sane_values_are_accepted(tmp_path, rng):
    source = tmp_path / "slices"
    write_stack(source, rng.integers(0, 60000, size=(4, 20, 30), dtype=np.uint16))
    args = ["--max_gb", "1048576", "--nlevels", "32", "--workers", "1024", "--dry_run"]
    result = scroll_to_ome(source, tmp_path / "out.zarr", *args)
    assert_ok(result)
    assert "level 31: 1 x 1 x 1" in result.stdout
    result = scroll_to_ome(source, tmp_path / "out.zarr", "--max_gb", 2**-20, "--chunk_size", "1024", "--dry_run")
    assert_one_line_error(result, "--max_gb 9.54e-07 is too small for chunks of 1024", code=2)
    # a bound that is not a whole number of bytes is quoted as given, not as the bytes below it (9.99e-07)
    result = scroll_to_ome(source, tmp_path / "out.zarr", "--max_gb", "1e-6", "--chunk_size", "1024", "--dry_run")
    assert_one_line_error(result, "--max_gb 1e-06 is too small for chunks of 1024", code=2)


def test_decompress_tiffs_refuses_absurd_workers(tmp_path, rng):
    source = tmp_path / "slices"
    write_stack(source, rng.integers(0, 60000, size=(2, 20, 30), dtype=np.uint16))
    result = run_script("decompress_tiffs.py", source, tmp_path / "out", "--workers", 100000)
    assert_one_line_error(result, "--workers must be at most 1024, not 100000", code=2)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A small synthetic scroll, plain and masked, with a .ppm along its sheet."""
    root = tmp_path_factory.mktemp("synthetic")
    for extra in ([], ["--masked"]):
        name = "masked" if extra else "scroll"
        args = [root / name, "--shape", 32, 64, 64, "--quiet", *extra]
        assert_ok(run_script("-m", "scrollzarr.synthetic", *args, "--ppm", root / f"{name}.ppm"))
    return root


def test_progress_written_to_a_pipe_has_no_carriage_return_updates(synthetic, tmp_path):
    results = [
        scroll_to_ome(synthetic / "scroll", tmp_path / "s.zarr", "--chunk_size", 16, "--nlevels", 2),
        run_script(
            "ppm_to_layers.py", synthetic / "scroll.ppm", tmp_path / "s.zarr", tmp_path / "layers", "--block_size", 8
        ),
        run_script("decompress_tiffs.py", synthetic / "masked", tmp_path / "plain"),
    ]
    for result in results:
        assert_ok(result)
        assert "\r" not in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) < 12, result.stderr  # the summary, no stream of updates


def on_a_terminal(script: str, *args: object) -> bytes:
    """Run ``script`` with its stderr on a terminal (a pseudo-terminal of 100 columns); what it wrote there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows of 100 columns
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(command, stderr=follower, stdout=subprocess.DEVNULL, env=env)
    os.close(follower)
    seen = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        seen += data
    os.close(leader)
    assert process.wait(timeout=300) == 0, seen
    return seen


def test_progress_on_a_terminal_is_the_bar(synthetic, tmp_path):
    seen = on_a_terminal(
        "scroll_to_ome.py", synthetic / "scroll", tmp_path / "s.zarr", "--chunk_size", 16, "--nlevels", 2
    )
    assert b"\r" in seen and b"level 0" in seen and b"vox/s" in seen and b"100%" in seen, seen
    seen = on_a_terminal("ppm_to_layers.py", synthetic / "scroll.ppm", tmp_path / "s.zarr", tmp_path / "layers")
    assert b"\r" in seen and b"rendering" in seen and b"px/s" in seen and b"100%" in seen, seen
    seen = on_a_terminal("decompress_tiffs.py", synthetic / "masked", tmp_path / "plain")
    assert b"\r" in seen and b"decompressing" in seen and b"files/s" in seen and b"100%" in seen, seen


def test_quiet_shows_neither_bar_nor_progress_lines(synthetic, tmp_path):
    result = run_script("decompress_tiffs.py", synthetic / "masked", tmp_path / "plain", "--quiet")
    assert_ok(result)
    assert result.stderr == ""


def test_without_a_terminal_progress_is_one_line_a_minute_with_fraction_and_eta(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    monkeypatch.setattr(report, "monotonic", lambda: now[0])
    bar = report.progress(400, "vox", "converting", quiet=False)
    caplog.set_level(logging.INFO, logger="scrollzarr")
    with bar:
        for seconds, done in [(10, 50), (59, 50), (61, 100), (100, 50), (120, 50), (122, 50)]:
            now[0] = 1000.0 + seconds
            bar.update(done)
            if seconds == 100:
                bar.set_description("level 1")
                bar.set_postfix_str("9/10 files")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "converting: 50.0 % done in 0:01:01, about 0:01:01 left",
        "level 1: 87.5 % done in 0:02:02, about 0:00:17 left; 9/10 files",
    ]


def test_quiet_progress_logs_nothing(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    monkeypatch.setattr(report, "monotonic", lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="scrollzarr")
    with report.progress(10, "B", "decompressing", quiet=True) as bar:
        for _ in range(10):
            now[0] += 100
            bar.update(1)
    assert caplog.records == []


def with_empty_filters(store: Path) -> Path:
    """``store`` with ``"filters": []`` in level 0's metadata, as some writers put it: zarr warns on reading it."""
    metadata = json.loads((store / "0" / ".zarray").read_text())
    metadata["filters"] = []
    (store / "0" / ".zarray").write_text(json.dumps(metadata))
    return store


def test_quiet_silences_zarrs_own_warnings(synthetic, tmp_path):
    store = tmp_path / "s.zarr"
    assert_ok(scroll_to_ome(synthetic / "scroll", store, "--chunk_size", 16, "--nlevels", 2, "--quiet"))
    with_empty_filters(store)
    loud = run_script("ppm_to_layers.py", synthetic / "scroll.ppm", store, tmp_path / "a")
    assert_ok(loud)
    warned = [line for line in loud.stderr.splitlines() if "empty list of filters" in line]
    assert len(warned) == 1 and warned[0].startswith("ppm_to_layers: ZarrUserWarning: Found an empty list"), loud.stderr
    for result in (
        run_script("ppm_to_layers.py", synthetic / "scroll.ppm", store, tmp_path / "b", "--quiet"),
        scroll_to_ome("unused", store, "--first_new_level", 2, "--nlevels", 3, "--quiet"),
    ):
        assert_ok(result)
        assert result.stderr == ""
