"""Shared helpers: writing real TIFF stacks, running the real scripts, and reading stores back."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parent.parent


# A shell starts a background job (``make test &``, ``nohup … &``) with SIGINT ignored, and a disposition to
# ignore is inherited: the scripts the tests start would then not see the Ctrl-C those tests send them. A
# handler is reset to the default in a child, so restoring Python's own gives each script its own again.
signal.signal(signal.SIGINT, signal.default_int_handler)


def write_stack(directory: Path, volume: np.ndarray, first: int = 0, digits: int = 5, **imwrite) -> list[Path]:
    """Write ``volume`` (z, y, x) as one TIFF per slice, numbered from ``first``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(volume):
        path = directory / f"{first + index:0{digits}d}.tif"
        tifffile.imwrite(path, image, **imwrite)
        paths.append(path)
    return paths


def write_sheet(directory: Path, shape: tuple[int, int, int]) -> tuple[Path, np.ndarray]:
    """``directory/sheet.ppm``: 300 pixels along the synthetic scroll's sheet through every slice, with an unmapped
    hole; its path and pixels (H, W, 6)."""
    from scrollzarr.ppm import write_ppm
    from scrollzarr.synthetic import sheet_surface

    surface = sheet_surface(shape, np.arange(shape[0], dtype=np.float64), 300)
    surface[10:17, 40:90] = 0
    path = directory / "sheet.ppm"
    write_ppm(path, surface)
    return path, surface


def run_script(script: str, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a top-level script of the checkout (or ``-m module``) in a fresh Python process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, script] if script == "-m" else [sys.executable, str(ROOT / script)]
    return subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def scroll_to_ome(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_script("scroll_to_ome.py", *args, cwd=cwd)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str, code: int | None = None) -> None:
    """Non-zero exit, no traceback, and one stderr line holding every fragment."""
    assert result.returncode != 0, result.stderr
    if code is not None:
        assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def chunk_files(array_dir: Path) -> list[Path]:
    """Chunk files of a zarr v2 array directory (everything but the dot-files)."""
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store, by path relative to it, with its bytes."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def chunk_count(directory: Path) -> int:
    """Chunk files under ``directory`` (every file but the dot-files); 0 if it does not exist yet."""
    if not directory.exists():
        return 0
    return sum(1 for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs of its own, to fill up or remount read-only (``mount -o remount,size=…|ro|rw``).

    Mounting needs root.  Not root: the test is skipped, saying so.  Root (as in CI) and the mount
    fails anyway: the test fails, because the full-disk and read-only promises would go unchecked.
    """
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        reason = f"cannot mount a small tmpfs at {mount}: {result.stderr.decode().strip()}"
        if os.geteuid() == 0:
            pytest.fail(f"{reason} (running as root, so the file system tests must run)")
        pytest.skip(f"{reason} (mounting needs root; running as uid {os.geteuid()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def direct_io_allowed(directory: Path) -> bool:
    """Whether the file system of ``directory`` accepts an O_DIRECT write, tried here independently."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / "probe"
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.write(descriptor, mmap.mmap(-1, 4096))  # a page-aligned block
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)
        probe.unlink()
