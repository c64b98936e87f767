"""Promises of the README that no other test pins down, each checked so that it fails without its feature:
--resume continues (it keeps what is on disk and reads only the unfinished slabs), a stop of the default
layout resumes with other --workers and --max_gb, the full-disk and read-only behaviour of ppm_to_layers
and decompress_tiffs, Gaussian levels with odd chunks, and more than two chunk rows at the default size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from test_convert import bytes_read, check_ome_store, default_need, make_volume

from scrollzarr import progress
from scrollzarr.ppm import write_ppm

from conftest import (
    ROOT,
    assert_ok,
    assert_one_line_error,
    chunk_count,
    read_json,
    run_script,
    scroll_to_ome,
    store_files,
    write_stack,
)
from reference import pyramid

# --- --resume continues; it does not start over ----------------------------------------------------------

CHUNK = 16
SHAPE = (160, 256, 320)  # 10 slabs of 16 slices; a slab of TIFFs is 2.5 MiB


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("promises") / "slices"
    volume = np.random.default_rng(11).integers(1, 65535, size=SHAPE, dtype=np.uint16)
    volume[:40, :100] = 0  # whole chunks never written
    write_stack(directory, volume)
    return directory


def killed(stack: Path, out: Path, args: list[object], when: Callable[[], bool]) -> None:
    """Start a conversion and SIGKILL it as soon as ``when()`` holds."""
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(stack), str(out), *map(str, args), "--quiet"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    while not when():
        assert process.poll() is None, "the run finished before it could be stopped"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def chunks_at_least(directory: Path, count: int) -> Callable[[], bool]:
    """Once ``count`` chunk files are in ``directory`` (mid-slab: chunk writes under way)."""
    return lambda: chunk_count(directory) >= count


def recorded(out: Path) -> dict:
    return read_json(out / progress.KEY)


def level_written(out: Path, level: int, planes: int) -> Callable[[], bool]:
    """Once the record says ``planes`` planes of a streamed ``level`` are written (the record is renamed into place)."""

    def check() -> bool:
        if not (out / progress.KEY).exists():
            return False
        streams = recorded(out)["streams"]
        return len(streams) > level and streams[level][2] >= planes

    return check


def test_resume_keeps_the_chunks_on_disk_and_reads_only_the_unfinished_slabs(slices, tmp_path):
    """Level 0 only, so that nothing held in memory is rebuilt from the store: the resumed run's reads, less
    those of a dry run of the same command (imports, headers, the record), are the pixels of the slabs the
    record does not list as done, never those of the finished ones; and every chunk of a finished slab is
    the very file written before the stop (inode and mtime unchanged)."""
    args = ["--chunk_size", CHUNK, "--nlevels", 1, "--workers", 1]
    out = tmp_path / "out.zarr"
    killed(slices, out, args, chunks_at_least(out / "0", 3 * 320 + 100))  # into the fourth slab (16 x 20 chunks each)
    recorded_before = recorded(out)
    done = recorded_before["slabs_done"]
    assert 3 <= done < SHAPE[0] // CHUNK, done
    kept = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in (out / "0").rglob("*")
        if p.is_file()
        and p.name[0] != "."
        and not p.name.endswith(".partial")
        and int(p.relative_to(out / "0").parts[0]) < done
    }
    assert len(kept) >= 3 * 300
    overhead = bytes_read(slices, out, *args, "--resume", "--dry_run")
    read = bytes_read(slices, out, *args, "--resume") - overhead
    plane = SHAPE[1] * SHAPE[2] * 2
    unfinished = (SHAPE[0] - done * CHUNK) * plane
    # planes the stopped run still held (written, not yet dropped) are read back from the store, not the TIFFs
    start, count, written, _ = recorded_before["streams"][0]
    held = (min(written, start + count) - start) * plane
    assert held <= CHUNK * plane
    assert unfinished <= read <= (unfinished + held) * 1.02, (read, unfinished, held, done)  # a redo: + done slabs
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept
    assert not (out / progress.KEY).exists()
    expected = np.asarray(zarr.open_array(str(out / "0"), mode="r")[...])
    np.testing.assert_array_equal(expected, np.stack([tifffile.imread(p) for p in sorted(slices.iterdir())]))


def test_resume_keeps_the_chunks_of_every_streamed_level(slices, tmp_path):
    """Four levels streamed together: the chunk rows the record lists as written at each level are kept
    as they are (inode and mtime), and the store ends equal to an uninterrupted run's."""
    args = ["--chunk_size", CHUNK, "--nlevels", 4, "--workers", 1]
    expected = tmp_path / "expected" / "out.zarr"
    assert_ok(scroll_to_ome(slices, expected, *args, "--quiet"))
    out = tmp_path / "out.zarr"
    killed(slices, out, args, level_written(out, 2, CHUNK))
    streams = recorded(out)["streams"]
    kept = {}
    for level, (_start, _count, written, _halved) in enumerate(streams):
        for p in (out / str(level)).rglob("*"):
            name = p.relative_to(out / str(level))
            if (
                p.is_file()
                and name.parts[0][0] != "."
                and not p.name.endswith(".partial")
                and int(name.parts[0]) < written // CHUNK
            ):
                kept[p] = (p.stat().st_ino, p.stat().st_mtime_ns)
    assert {p.relative_to(out).parts[0] for p in kept} == {"0", "1", "2"}, "some level had no finished chunk row"
    assert_ok(scroll_to_ome(slices, out, *args, "--resume", "--quiet"))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept
    assert store_files(out) == store_files(expected)


# --- the default layout, stopped, resumed with other --workers and --max_gb ------------------------------


@pytest.fixture(scope="module")
def default_reference(slices, tmp_path_factory) -> dict[str, bytes]:
    """An uninterrupted run with worker and writer threads."""
    out = tmp_path_factory.mktemp("default") / "out.zarr"  # the same name as below: it is in the metadata
    assert_ok(scroll_to_ome(slices, out, "--chunk_size", CHUNK, "--nlevels", 4, "--workers", 2, "--quiet"))
    return store_files(out)


@pytest.mark.parametrize(
    "resume_with",
    [
        ["--workers", 1],
        ["--workers", 3],
        ["--workers", 2, "--max_gb", 0.002],  # a bound the stopped run's bands exceed: its cut is kept
        ["--workers", 1, "--max_gb", 1],
    ],
    ids=["workers-1", "workers-3", "max_gb-smaller", "workers-1-max_gb-larger"],
)
def test_the_default_layout_killed_mid_write_resumes_with_other_workers_and_max_gb(
    slices, default_reference, tmp_path, resume_with
):
    args = ["--chunk_size", CHUNK, "--nlevels", 4]
    out = tmp_path / "out.zarr"
    killed(slices, out, [*args, "--workers", 2], chunks_at_least(out / "0", 2 * 320 + 150))  # third slab, writers busy
    assert (out / progress.KEY).exists()
    assert_ok(scroll_to_ome(slices, out, *args, *resume_with, "--resume", "--quiet"))
    assert store_files(out) == default_reference


# --- a full disk and a read-only output, for ppm_to_layers and decompress_tiffs --------------------------


@pytest.fixture
def render_inputs(tmp_path) -> tuple[Path, Path]:
    """A volume and a 512 x 512 surface through it: five layers of 512 KiB and a stacked image of 512 KiB."""
    volume = np.random.default_rng(2).integers(1, 65535, size=(16, 16, 16), dtype=np.uint16)
    store = tmp_path / "v.zarr"
    write_stack(tmp_path / "slices", volume)
    assert_ok(scroll_to_ome(tmp_path / "slices", store, "--chunk_size", 16, "--nlevels", 1, "--quiet"))
    v, u = np.mgrid[0:512, 0:512]
    surface = np.zeros((512, 512, 6))
    surface[..., 0] = 2 + u / 64  # x
    surface[..., 1] = 8.0  # y
    surface[..., 2] = 2 + v / 64  # z
    surface[..., 4] = 1.0
    write_ppm(tmp_path / "s.ppm", surface)
    return tmp_path / "s.ppm", store


def test_ppm_to_layers_on_a_full_disk_is_one_message_and_leaves_no_file(render_inputs, small_tmpfs):
    """The layer TIFFs (2.5 MiB) fit the 3 MiB file system, and so does the stacked image (0.5 MiB), but not
    both: the disk fills while the images are written (or the check before writing sees it).  One message,
    exit 1, and no TIFF under a final name nor a temporary file is left."""
    ppm, store = render_inputs
    options = ["--number_of_layers", 5, "--workers", 1]
    result = run_script("ppm_to_layers.py", ppm, store, small_tmpfs / "layers", small_tmpfs / "stack.tif", *options)
    assert_one_line_error(result, "free some space", code=1)
    assert not (small_tmpfs / "stack.tif").exists()
    left = sorted(p.name for p in small_tmpfs.rglob("*") if p.is_file())
    assert left == [], left


def test_decompress_tiffs_to_a_read_only_output_is_one_message(tmp_path, small_tmpfs):
    source = tmp_path / "in"
    source.mkdir()
    data = np.random.default_rng(4).integers(0, 65535, size=(64, 64), dtype=np.uint16)
    for z in range(3):
        tifffile.imwrite(source / f"{z:05d}.tif", data, compression="zlib")
    (small_tmpfs / "out").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:
        result = run_script("decompress_tiffs.py", source, small_tmpfs / "out", "--workers", 1)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert_one_line_error(result, "cannot write", "Read-only file system", "make the output writable", code=1)
    assert list((small_tmpfs / "out").iterdir()) == []
    assert_ok(run_script("decompress_tiffs.py", source, small_tmpfs / "out", "--workers", 1, "--quiet"))
    for z in range(3):
        np.testing.assert_array_equal(tifffile.imread(small_tmpfs / "out" / f"{z:05d}.tif"), data)


# --- levels compared with numpy where no test compared them ----------------------------------------------


@pytest.mark.parametrize("chunk", [7, 15])
@pytest.mark.parametrize("read_back", [False, True], ids=["streamed", "read-back"])
def test_gaussian_with_odd_chunks_matches_the_reference(tmp_path, rng, chunk, read_back):
    """Gaussian smoothing needs planes beyond a chunk row; with odd chunks a halved pair straddles two rows;
    under --max_gb the levels are built from the stored level above, block by block, with a margin."""
    volume = make_volume(rng, (37, 150, 170))
    write_stack(tmp_path / "slices", volume)
    out = tmp_path / "out.zarr"
    args = ["--chunk_size", chunk, "--nlevels", 4, "--algorithm", "gaussian", "--workers", 1]
    if read_back:
        args += ["--max_gb", default_need(tmp_path / "slices", out, *args) / 8 / 2**30]
        plan = scroll_to_ome(tmp_path / "slices", out, *args, "--dry_run")
        assert "from the stored level above" in plan.stdout, plan.stdout + plan.stderr
    assert_ok(scroll_to_ome(tmp_path / "slices", out, *args, "--quiet"))
    check_ome_store(out, pyramid(volume, 4, "gaussian"), chunk)


def test_more_than_two_chunk_rows_at_the_default_chunk_size(tmp_path, rng):
    """300 slices: three chunk rows of 128 at level 0, two at level 1; every level against numpy."""
    volume = make_volume(rng, (300, 24, 20))
    write_stack(tmp_path / "slices", volume)
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(tmp_path / "slices", out, "--quiet"))
    levels = pyramid(volume, 6)
    assert [level.shape[0] for level in levels] == [300, 150, 75, 38, 19, 10]
    check_ome_store(out, levels, 128)
    assert {p.name for p in (out / "0").iterdir() if not p.name.startswith(".")} == {"0", "1", "2"}
