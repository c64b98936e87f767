"""Never lose a day of work: stopped runs (SIGKILL, SIGINT, SIGTERM, a full disk) resume to the very
store an uninterrupted run writes, file for file; unfinished stores are recognisable and refused."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import scroll_to_ome as cli
from scrollzarr import progress
from scrollzarr import sinks as sinks_module
from scrollzarr import tasks as tasks_module
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
ARGS = ["--chunk_size", CHUNK, "--nlevels", 4, "--workers", 1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    """Enough slices and chunks that each phase of a run lasts long enough to be stopped in."""
    directory = tmp_path_factory.mktemp("resume") / "slices"
    rng = np.random.default_rng(7)
    volume = rng.integers(1, 65535, size=(160, 256, 320), dtype=np.uint16)
    volume[:40, :100] = 0  # whole chunks never written
    write_stack(directory, volume)
    return directory


class References:
    """The stores uninterrupted runs write, made once per set of extra options."""

    def __init__(self, stack: Path, root: Path) -> None:
        self.stack, self.root, self.stores = stack, root, {}

    def __getitem__(self, extra: tuple[str, ...]) -> dict[str, bytes]:
        if extra not in self.stores:
            out = self.root / str(len(self.stores)) / "out.zarr"  # the same name: it is in the metadata
            assert_ok(scroll_to_ome(self.stack, out, *ARGS, *extra))
            self.stores[extra] = store_files(out)
        return self.stores[extra]


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory) -> References:
    return References(stack, tmp_path_factory.mktemp("reference"))


def start(stack: Path, out: Path, *extra: object) -> subprocess.Popen[str]:
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(stack), str(out), *map(str, ARGS), *map(str, extra)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def wait_for(condition, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run finished before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.002)


def killed_run(stack: Path, out: Path, chunks: int = 10) -> Path:
    """``out`` as a run left it when killed (SIGKILL) after writing ``chunks`` level-0 chunks."""
    process = start(stack, out)
    wait_for(lambda: chunk_count(out / "0") >= chunks, process)
    process.kill()
    process.communicate()
    return out


def recorded_chunks(out: Path, zarr_only: bool) -> dict[Path, tuple[int, int]]:
    """The chunk files the progress record says are finished, with their inode and mtime_ns.

    Worked out for bands of whole planes (the default): the chunk rows in z of each streamed level below
    the record's written planes, or every chunk of the streamed levels once the band is done.  Empty
    for narrower bands (``--max_gb``).
    """
    record = read_json(out / progress.KEY)
    rows, cols, streamed = record["bands"]
    directories = [out] if zarr_only else [out / str(level) for level in range(streamed + 1)]
    meta = read_json(directories[0] / ".zarray")
    chunk, (_, height, width) = meta["chunks"][0], meta["shape"]
    if rows < height or cols < width:
        return {}
    kept = {}
    for level, directory in enumerate(directories):
        if record["bands_done"]:
            limit = float("inf")
        else:
            limit = record["streams"][level][2] // chunk if record["streams"] else 0
        for path in directory.rglob("*"):
            name = path.relative_to(directory).parts
            if path.is_file() and name[0].isdigit() and not path.name.endswith(".partial") and int(name[0]) < limit:
                kept[path] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return kept


def test_plan_of_the_read_back_reference_reads_back(stack, tmp_path):
    plan = scroll_to_ome(stack, tmp_path / "o.zarr", *ARGS, "--max_gb", "0.002", "--dry_run")
    assert "from the stored level above each" in plan.stdout


@pytest.mark.parametrize(
    ("extra", "level", "after"),
    [
        ((), "0", 30),  # in the first pass, a few slabs in
        ((), "2", 1),  # a streamed lower level has started
        (("--max_gb", "0.002"), "2", 1),  # a level built from the stored level above
        (("--max_gb", "0.002"), "3", 1),
        (("--algorithm", "gaussian"), "2", 1),  # planes held for context are rebuilt too
        (("--chunk_size", "15"), "1", 1),  # odd chunks: a plane waits for its pair across slabs
        (("--chunk_size", "15", "--algorithm", "gaussian"), "0", 700),
        (("--zarr_only",), "1", 30),  # a plain array: chunk keys z/y/x at its root, so "1" is z chunk row 1
    ],
)
def test_sigkill_then_resume_gives_the_same_files(stack, reference, tmp_path, extra, level, after):
    out = tmp_path / "out.zarr"
    process = start(stack, out, *extra)
    wait_for(lambda: chunk_count(out / level) >= after, process)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert "multiscales" not in read_json(out / ".zattrs")
    assert (out / progress.KEY).exists()  # visibly unfinished
    refused = scroll_to_ome(stack, out, *ARGS, *extra)
    assert_one_line_error(refused, "is an unfinished conversion", "--resume", "--overwrite", code=1)
    kept = recorded_chunks(out, "--zarr_only" in extra)
    record = read_json(out / progress.KEY)
    nothing_finished = record["bands_done"] == record["slabs_done"] == 0
    assert kept or nothing_finished or "--max_gb" in extra, record
    assert_ok(scroll_to_ome(stack, out, *ARGS, *extra, "--resume"))
    assert store_files(out) == reference[extra]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept  # continued, not redone


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_and_print_the_command_to_resume(stack, reference, tmp_path, sig, code):
    out = tmp_path / "out.zarr"
    process = start(stack, out)
    wait_for(lambda: chunk_count(out / "0") >= 400, process)  # into the second slab of 16 slices (320 chunks)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert "stopped; on disk and recorded: level 0: 0 of 1 band(s) and" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("scroll_to_ome: interrupted; to continue: ")
    command = shlex.split(last.split("to continue: ", 1)[1])
    assert command[-1] == "--resume"
    resumed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert_ok(resumed)
    assert store_files(out) == reference[()]


@pytest.mark.parametrize(
    ("change", "option"),
    [
        (["--chunk_size", "8"], "--chunk_size was 16"),
        (["--nlevels", "3"], "--nlevels was 4"),
        (["--ranges", "0:100,,"], "--ranges was"),
        (["--algorithm", "max"], "--algorithm was 'mean'"),
        (["--obytes", "1"], "--obytes was 0"),
        (["--zarr_only"], "--zarr_only was False"),
        (["--bad_slices", "zero"], "--bad_slices was 'error'"),
    ],
)
def test_resume_with_another_option_is_refused(stack, tmp_path, change, option):
    out = killed_run(stack, tmp_path / "out.zarr")
    (out / LOCK_NAME).unlink()  # the killed run's lock file: any later run takes the lock and removes it
    before = store_files(out)
    args = [*ARGS, *change]  # the later value of a repeated option wins
    result = scroll_to_ome(stack, out, *args, "--resume")
    assert_one_line_error(result, f"cannot resume {out}", option, "resume with the options of the stopped run", code=2)
    assert store_files(out) == before


def test_resume_from_another_input_directory_is_refused(stack, tmp_path):
    out = killed_run(stack, tmp_path / "out.zarr")
    copy = tmp_path / "copy"
    shutil.copytree(stack, copy)
    result = scroll_to_ome(copy, out, *ARGS, "--resume")
    assert_one_line_error(result, "the input directory was", code=2)


def test_nothing_to_resume(stack, tmp_path, reference):
    result = scroll_to_ome(stack, tmp_path / "none.zarr", *ARGS, "--resume")
    assert_one_line_error(result, "nothing to resume", code=1)
    done = tmp_path / "done.zarr"
    assert_ok(scroll_to_ome(stack, done, *ARGS))
    assert not (done / progress.KEY).exists()
    assert_one_line_error(scroll_to_ome(stack, done, *ARGS, "--resume"), "nothing to resume", code=1)
    result = scroll_to_ome(stack, done, *ARGS, "--resume", "--overwrite")
    assert_one_line_error(result, "give one of them", code=2)


def test_first_new_level_refuses_an_unfinished_store(stack, tmp_path):
    out = killed_run(stack, tmp_path / "out.zarr")
    result = scroll_to_ome(stack, out, "--first_new_level", 1, "--nlevels", 5)
    assert_one_line_error(result, "is an unfinished conversion", "--resume", code=1)


@pytest.mark.parametrize("where", ["metadata", "record removal"])
def test_stop_while_finishing_resumes(stack, reference, tmp_path, monkeypatch, capsys, where):
    """A stop between the last chunk and the end: before the metadata is written, or after it but
    before the progress record is removed (simulated in-process: the moment is too short to hit)."""
    out = tmp_path / "out.zarr"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "metadata":
        monkeypatch.setattr(zarr.core.attributes.Attributes, "update", stop)
    else:
        monkeypatch.setattr(progress, "remove", stop)
    argv = [str(stack), str(out), *map(str, ARGS), "--quiet"]
    assert cli.main(argv) == 130
    assert "to continue:" in capsys.readouterr().err
    monkeypatch.undo()
    assert (out / progress.KEY).exists()
    assert_ok(scroll_to_ome(stack, out, *ARGS, "--resume"))
    assert store_files(out) == reference[()]


def test_disk_full_injected_at_the_storage_layer(stack, reference, tmp_path, monkeypatch, capsys):
    """The chunk file writes raise ENOSPC from the 40th on: one message, exit 1, and --resume finishes."""
    out = tmp_path / "out.zarr"
    original = sinks_module.write_file
    writes = {"count": 0}

    def write_until_full(path, data, **how):
        writes["count"] += 1
        if writes["count"] >= 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(path, data, **how)

    monkeypatch.setattr(sinks_module, "write_file", write_until_full)
    assert cli.main([str(stack), str(out), *map(str, ARGS), "--quiet"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert "no space left on the device" in errors[0]
    assert "free some space; then continue with:" in errors[0] and errors[0].endswith("--resume")
    monkeypatch.undo()
    assert_ok(scroll_to_ome(stack, out, *ARGS, "--resume"))
    assert store_files(out) == reference[()]


def test_disk_full_on_a_real_small_file_system(stack, reference, small_tmpfs):
    out = small_tmpfs / "out.zarr"
    result = scroll_to_ome(stack, out, *ARGS, "--quiet")
    assert_one_line_error(result, "no space left on the device", "--resume", code=1)
    assert (out / progress.KEY).exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)  # space is back
    assert_ok(scroll_to_ome(stack, out, *ARGS, "--resume"))
    assert store_files(out) == reference[()]


def test_bad_slices_zero_records_them(tmp_path, rng):
    volume = rng.integers(1, 65535, size=(20, 30, 40), dtype=np.uint16)
    paths = write_stack(tmp_path / "slices", volume)
    paths[7].write_bytes(paths[7].read_bytes()[:1000])  # truncated
    paths[12].write_bytes(b"not a tiff")
    out = tmp_path / "out.zarr"
    refused = scroll_to_ome(tmp_path / "slices", out, "--chunk_size", CHUNK)
    assert_one_line_error(refused, "2 slice(s) cannot be used", "00007.tif: truncated", "00012.tif", code=1)
    assert "--bad_slices zero" in refused.stderr
    assert not out.exists()  # found before any chunk was written
    result = scroll_to_ome(tmp_path / "slices", out, "--chunk_size", CHUNK, "--nlevels", 2, "--bad-slices", "zero")
    assert_ok(result)
    assert "2 bad slice(s) will be written as zeros" in result.stderr
    assert "bad slices, written as zeros: 7, 12" in result.stderr
    assert read_json(out / ".zattrs")["scrollzarr"]["bad_slices"] == [7, 12]
    expected = volume.copy()
    expected[[7, 12]] = 0
    levels = pyramid(expected, 2)
    group = zarr.open_group(str(out), mode="r")
    for index, level in enumerate(levels):
        np.testing.assert_array_equal(group[str(index)][...], level)


def test_a_slice_unreadable_during_the_run_becomes_zeros_when_asked(tmp_path, rng):
    volume = rng.integers(1, 65535, size=(20, 30, 40), dtype=np.uint16)
    paths = write_stack(tmp_path / "slices", volume, compression="zlib")
    data = bytearray(paths[5].read_bytes())
    data[200:400] = b"\xff" * 200  # the header is intact, the pixels are not
    paths[5].write_bytes(bytes(data))
    out = tmp_path / "out.zarr"
    result = scroll_to_ome(tmp_path / "slices", out, "--chunk_size", CHUNK, "--nlevels", 1, "--bad_slices", "zero")
    assert_ok(result)
    assert "00005.tif: cannot read slice 5" in result.stderr and "written as zeros" in result.stderr
    assert read_json(out / ".zattrs")["scrollzarr"]["bad_slices"] == [5]
    expected = volume.copy()
    expected[5] = 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][...], expected)


def test_a_slice_that_breaks_after_its_first_stripe_is_zero_from_there_on(tmp_path, rng, monkeypatch, capsys):
    """Slab rows are read a stripe (one chunk row) at a time: the rows read before the failure are kept."""
    volume = rng.integers(1, 65535, size=(20, 40, 24), dtype=np.uint16)
    paths = write_stack(tmp_path / "slices", volume)
    original = tasks_module.read_rows
    header = paths[5].stat().st_size - volume[5].nbytes  # the pixels are the file's tail

    def read_then_truncate(stack, z, rows, cols, out):
        original(stack, z, rows, cols, out)
        if z == 5 and rows[0] == 0:  # the disk loses the slice once its first stripe has been read
            os.truncate(paths[5], header + CHUNK * 24 * 2)

    monkeypatch.setattr(tasks_module, "read_rows", read_then_truncate)  # slices are read through tasks.SliceSource
    out = tmp_path / "out.zarr"
    argv = [str(tmp_path / "slices"), str(out), "--chunk_size", str(CHUNK), "--nlevels", "2", "--bad_slices", "zero"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "00005.tif: cannot read slice 5" in err and f"written as zeros from row {CHUNK} on" in err
    monkeypatch.undo()
    assert read_json(out / ".zattrs")["scrollzarr"]["bad_slices"] == [5]
    expected = volume.copy()
    expected[5, CHUNK:] = 0
    group = zarr.open_group(str(out), mode="r")
    for index, level in enumerate(pyramid(expected, 2)):
        np.testing.assert_array_equal(group[str(index)][...], level)


def test_missing_slices_are_in_the_summary(tmp_path, rng):
    paths = write_stack(tmp_path / "slices", rng.integers(1, 9, size=(6, 8, 8), dtype=np.uint16))
    paths[3].unlink()
    result = scroll_to_ome(tmp_path / "slices", tmp_path / "o.zarr", "--chunk_size", 4, "--nlevels", 1)
    assert_ok(result)
    assert "missing slices, written as zeros: 3" in result.stderr


def test_overwrite_refuses_an_output_inside_the_input(tmp_path, rng):
    write_stack(tmp_path / "slices", rng.integers(1, 9, size=(3, 8, 8), dtype=np.uint16))
    inside = tmp_path / "slices" / "out.zarr"
    inside.mkdir()
    (inside / ".zgroup").write_text('{"zarr_format": 2}')
    result = scroll_to_ome(tmp_path / "slices", inside, "--overwrite")
    assert_one_line_error(result, "is inside the input directory", code=1)
    assert (inside / ".zgroup").exists()


def test_every_file_is_written_under_a_temporary_name_first(stack, tmp_path):
    """A kill mid-write leaves at most *.partial files, which --resume removes (the store renames into place)."""
    out = killed_run(stack, tmp_path / "out.zarr")
    chunks = [p for p in out.rglob("*") if p.is_file() and p.parent != out and not p.name.startswith(".")]
    for path in chunks:
        if not path.name.endswith(".partial"):
            assert path.stat().st_size == CHUNK**3 * 2  # never a truncated chunk under a final name
    (chunks[0].parent / "7.abc.partial").write_bytes(b"half")  # as a write cut off by the kill leaves it
    assert_ok(scroll_to_ome(stack, out, *ARGS, "--resume"))
    assert not list(out.rglob("*.partial"))


def test_a_stopped_rebuild_is_unfinished_and_resume_finishes_it(stack, tmp_path):
    rebuild = ["--first_new_level", "1", "--nlevels", "4", "--chunk_size", str(CHUNK), "--workers", "1"]
    expected = tmp_path / "a" / "out.zarr"
    assert_ok(scroll_to_ome(stack, expected, "--chunk_size", CHUNK, "--nlevels", 1))
    assert_ok(scroll_to_ome(stack, expected, *rebuild))
    out = tmp_path / "b" / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", CHUNK, "--nlevels", 1))
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(stack), str(out), *rebuild]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wait_for(lambda: chunk_count(out / "1") >= 5, process)
    process.kill()
    process.communicate()
    assert (out / progress.KEY).exists()
    result = scroll_to_ome(stack, out, "--first_new_level", 2, "--nlevels", 4)
    assert_one_line_error(result, "is an unfinished rebuild (--first_new_level 1)", "--resume", code=1)
    result = scroll_to_ome(stack, out, "--first_new_level", 2, "--nlevels", 4, "--resume")
    assert_one_line_error(result, "--first_new_level was 1 in the stopped run, now 2", code=2)
    assert_ok(scroll_to_ome(stack, out, *rebuild, "--resume"))
    assert store_files(out) == store_files(expected)


def test_read_only_output_is_one_message_and_stays_resumable(stack, reference, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    out = killed_run(stack, small_tmpfs / "out.zarr")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    result = scroll_to_ome(stack, out, *ARGS, "--resume")
    assert_one_line_error(result, "cannot write", "Read-only file system", "make the output writable", code=1)
    subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert_ok(scroll_to_ome(stack, out, *ARGS, "--resume"))
    assert store_files(out) == reference[()]
