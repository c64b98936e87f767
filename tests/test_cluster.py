"""scroll_to_ome --scheduler: the conversion on a real Dask cluster writes the local run's store, byte for byte.

Clusters are real: a ``LocalCluster`` (``--scheduler local:2``, two worker
processes of one thread) and a ``dask scheduler`` with two ``dask worker``
processes started here.  Every store is compared file for file with the
local run of the same input, and its voxels with an independent pyramid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import ROOT, assert_ok, assert_one_line_error, read_json, scroll_to_ome, store_files, write_stack
from reference import pyramid

pytest.importorskip("distributed")

CHUNK = 16
LEVELS = 3
# a cut that gives every level several tasks: level 0 is 5 rows of chunks in z, and the budget
# keeps each band and each read-back block to a part of the plane
SMALL = ("--max_gb", "0.0004")
LAYOUTS = {
    "zarr 2": (),
    "zarr 3, sharded, blosc-zstd": ("--zarr_format", "3", "--shard_shape", "16,32,32", "--compressor", "blosc-zstd"),
}


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """A scroll-like volume: a bright sheet in a masked (zero) cylinder, uint16, odd sizes."""
    z, y, x = np.mgrid[0:75, 0:90, 0:70]
    inside = (y - 45) ** 2 + (x - 35) ** 2 < 40**2
    values = (1000 + 37 * z + 11 * y + 5 * x + 3000 * (np.abs(y - 45 - 0.3 * z) < 4)) % 65536
    return np.where(inside, values, 0).astype(np.uint16)


@pytest.fixture(scope="module")
def slices(volume: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cluster") / "slices"
    write_stack(directory, volume, compression="zlib")
    return directory


def convert(slices: Path, out: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return scroll_to_ome(slices, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, "--quiet", *args)


@pytest.fixture(scope="module")
def local_stores(slices: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """The local run's store for each layout, file by file (the store is named ``s.zarr`` everywhere: its
    name is in its metadata)."""
    stores = {}
    for name, args in LAYOUTS.items():
        out = tmp_path_factory.mktemp("local") / "s.zarr"
        assert_ok(convert(slices, out, *args))
        stores[name] = store_files(out)
    return stores


def check_pyramid(out: Path, volume: np.ndarray) -> None:
    group = zarr.open_group(str(out), mode="r")
    for level, expected in enumerate(pyramid(volume, LEVELS)):
        np.testing.assert_array_equal(group[str(level)][...], expected)


def finished_tasks(out: Path) -> int:
    return sum(1 for _ in (out / "scrollzarr_tasks").rglob("*.json")) if (out / "scrollzarr_tasks").exists() else 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_local_cluster_writes_the_local_runs_store(layout, slices, volume, local_stores, tmp_path):
    out = tmp_path / "s.zarr"
    result = convert(slices, out, *LAYOUTS[layout], *SMALL, "--scheduler", "local:2")
    assert_ok(result)
    assert store_files(out) == local_stores[layout]
    check_pyramid(out, volume)


def test_the_plan_shows_several_tasks_per_level(slices, tmp_path):
    out = tmp_path / "s.zarr"
    result = scroll_to_ome(
        slices, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, "-v", *SMALL, "--scheduler", "local:2"
    )
    assert_ok(result)
    counts = [int(found[1]) for found in re.finditer(r"level \d+: (\d+) tasks, ", result.stderr)]
    assert len(counts) == LEVELS and all(count > 1 for count in counts), result.stderr


class Cluster:
    """A ``dask scheduler`` and worker processes (no nannies: a killed worker stays dead), on this machine."""

    def __init__(self, directory: Path, workers: int, paths: tuple[Path, ...] = (), **env: str) -> None:
        directory.mkdir()
        self.file = directory / "scheduler.json"
        # the workers import scrollzarr (the tasks name its functions) and any module of ``paths``
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (*paths, ROOT))), **env)
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(self.file),
             "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.file.exists() or not self.file.read_text().strip():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written whole (json.dump) but may be read mid-write
        self.address = json.loads(self.file.read_text())["address"]
        self.workers = [self.start_worker() for _ in range(workers)]

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(self.file),
             "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
        )  # fmt: skip

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            process.kill()
            process.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path / "cluster", 2)
    yield started
    started.stop()


@pytest.fixture
def slow_tasks(tmp_path: Path) -> Path:
    """A directory with a module that, preloaded in a worker, makes each task take 0.3 s longer (the first task
    of a worker process ``SCROLLZARR_SLOW_FIRST`` seconds, if longer): runs long enough to be stopped in the
    middle, whatever the machine's speed."""
    directory = tmp_path / "slow"
    directory.mkdir()
    (directory / "scrollzarr_slow.py").write_text(
        "import os, time\n"
        "import scrollzarr.tasks\n"
        "_run_task = scrollzarr.tasks.run_task\n"
        "_first = [float(os.environ.get('SCROLLZARR_SLOW_FIRST', '0.3'))]\n"
        "def run_task(job, task):\n"
        "    time.sleep(max(_first[0], 0.3))\n"
        "    _first[0] = 0\n"
        "    return _run_task(job, task)\n"
        "scrollzarr.tasks.run_task = run_task\n"
    )
    return directory


SLOW = {"DASK_DISTRIBUTED__WORKER__PRELOAD": '["scrollzarr_slow"]'}


def test_a_real_scheduler_and_workers_write_the_local_runs_store(cluster, slices, volume, local_stores, tmp_path):
    for name, address in (("file", str(cluster.file)), ("address", cluster.address)):
        for layout, args in LAYOUTS.items():
            out = tmp_path / name / layout.replace(" ", "_").replace(",", "") / "s.zarr"
            out.parent.mkdir(parents=True)
            assert_ok(convert(slices, out, *args, *SMALL, "--scheduler", address))
            assert store_files(out) == local_stores[layout], (name, layout)
    check_pyramid(out, volume)


def test_the_scheduler_is_taken_from_the_environment(cluster, slices, local_stores, tmp_path):
    out = tmp_path / "s.zarr"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DASK_SCHEDULER_ADDRESS=cluster.address)
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(slices), str(out), "--chunk_size", str(CHUNK)]
    result = subprocess.run(
        [*command, "--nlevels", str(LEVELS), *SMALL, "-v"], capture_output=True, text=True, env=env, timeout=600
    )
    assert_ok(result)
    assert f"Dask cluster at {cluster.address}: " in result.stderr
    assert store_files(out) == local_stores["zarr 2"]


def start_conversion(
    slices: Path, out: Path, *args: object, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start a conversion; ``env``'s ``PYTHONPATH`` goes before the checkout's."""
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(slices), str(out), "--chunk_size", str(CHUNK)]
    env = dict(env or {})
    path = os.pathsep.join([*filter(None, [env.pop("PYTHONPATH", None)]), str(ROOT)])
    return subprocess.Popen(
        [*command, "--nlevels", str(LEVELS), "--quiet", *SMALL, *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env, PYTHONPATH=path),
    )  # fmt: skip


def wait_for_tasks(out: Path, process: subprocess.Popen[str], count: int) -> None:
    """Wait until ``count`` tasks have marked themselves finished, with the run still going."""
    deadline = time.monotonic() + 120
    while finished_tasks(out) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_worker_killed_mid_run_leaves_the_store_as_the_local_runs(tmp_path, slices, volume, local_stores, slow_tasks):
    cluster = Cluster(tmp_path / "cluster", 2, (slow_tasks,), **SLOW)
    try:
        out = tmp_path / "s.zarr"
        process = start_conversion(slices, out, "--scheduler", cluster.file)
        wait_for_tasks(out, process, 2)
        cluster.workers[0].send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        assert store_files(out) == local_stores["zarr 2"]
        check_pyramid(out, volume)
    finally:
        cluster.stop()


def test_a_client_killed_mid_run_is_resumed_to_the_local_runs_store(tmp_path, slices, volume, local_stores, slow_tasks):
    cluster = Cluster(tmp_path / "cluster", 2, (slow_tasks,), **SLOW)
    try:
        out = tmp_path / "s.zarr"
        process = start_conversion(slices, out, "--scheduler", cluster.file)
        wait_for_tasks(out, process, 3)
        process.kill()
        process.communicate()
        assert (out / "scrollzarr_progress.json").exists() and "multiscales" not in read_json(out / ".zattrs")
        result = scroll_to_ome(
            slices, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, *SMALL, "--scheduler", cluster.file, "--resume",
            "-v",
        )  # fmt: skip
        assert_ok(result)
        assert store_files(out) == local_stores["zarr 2"]
        check_pyramid(out, volume)
        skipped = re.search(r"level 0: (\d+) tasks, (\d+) finished before", result.stderr)
        assert skipped is not None and 3 <= int(skipped[2]) < int(skipped[1]), result.stderr
    finally:
        cluster.stop()


def test_a_cluster_run_is_resumed_on_this_machine(tmp_path, slices, volume, local_stores, slow_tasks):
    out = tmp_path / "s.zarr"
    process = start_conversion(slices, out, "--scheduler", "local:2", env={"PYTHONPATH": str(slow_tasks), **SLOW})
    wait_for_tasks(out, process, 2)
    process.kill()
    process.communicate()
    result = scroll_to_ome(slices, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, *SMALL, "--resume", "-v")
    assert_ok(result)
    assert re.search(r"level 0: \d+ tasks, [1-9]\d* finished before", result.stderr), result.stderr
    assert store_files(out) == local_stores["zarr 2"]


def test_a_local_run_is_not_resumed_on_a_cluster(tmp_path, slices):
    out = tmp_path / "s.zarr"
    process = start_conversion(slices, out)
    deadline = time.monotonic() + 60
    while not (out / "scrollzarr_progress.json").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.kill()
    process.communicate()
    result = convert(slices, out, *SMALL, "--resume", "--scheduler", "local:1")
    assert_one_line_error(result, "cannot resume", "started without --scheduler", "resume it without --scheduler")


def test_a_slice_that_cannot_be_read_stops_the_run_resumably(tmp_path, volume):
    slices = tmp_path / "slices"
    paths = write_stack(slices, volume, compression="zlib")
    good = paths[40].read_bytes()
    broken = bytearray(good)
    broken[300:600] = b"\xff" * 300  # the header is intact, the pixels are not
    paths[40].write_bytes(bytes(broken))
    out = tmp_path / "s.zarr"
    result = convert(slices, out, *SMALL, "--scheduler", "local:2")
    assert_one_line_error(result, "00040.tif: cannot read slice 40", "--bad_slices zero")
    assert (out / "scrollzarr_progress.json").exists() and "multiscales" not in read_json(out / ".zattrs")
    result = convert(slices, out, *SMALL, "--scheduler", "local:2", "--resume", "--bad_slices", "zero")
    assert_one_line_error(result, "cannot resume", "--bad_slices was 'error' in the stopped run")
    result = convert(slices, tmp_path / "zero.zarr", *SMALL, "--scheduler", "local:2", "--bad_slices", "zero")
    assert_ok(result)
    # the worker that found it logs why, on its side; the client says which slice became zeros
    assert re.search(r"slice 40 could not be read by the task for level 0, .*; written as zeros", result.stderr)
    expected = volume.copy()
    expected[40] = 0
    check_pyramid(tmp_path / "zero.zarr", expected)
    assert json.loads((tmp_path / "zero.zarr" / ".zattrs").read_text())["scrollzarr"]["bad_slices"] == [40]


def bad_midway(directory: Path, volume: np.ndarray) -> tuple[Path, Path]:
    """Slices of ``volume`` in strips of 5 rows, slice 40's rows 40 to 44 (strip 8) unreadable, and the local
    run of them with ``--bad_slices zero``: (slices, its store)."""
    import tifffile

    slices = directory / "slices"
    paths = write_stack(slices, volume, compression="zlib", rowsperstrip=5)
    with tifffile.TiffFile(paths[40]) as tif:
        offset, count = tif.pages[0].dataoffsets[8], tif.pages[0].databytecounts[8]
    broken = bytearray(paths[40].read_bytes())
    broken[offset : offset + count] = b"\xff" * count
    paths[40].write_bytes(bytes(broken))
    local = directory / "local" / "s.zarr"
    local.parent.mkdir()
    assert_ok(convert(slices, local, *SMALL, "--bad_slices", "zero"))
    expected = volume.copy()
    expected[40, 40:] = 0
    check_pyramid(local, expected)
    return slices, local


def test_a_slice_bad_from_a_strip_midway_is_zeros_from_that_row_on_in_every_task_as_in_the_local_run(tmp_path, volume):
    """A task whose rows of the slice lie below its bad strip reads them without a failure; it is run again once
    the task that found the strip has said from which row the slice is zeros."""
    slices, local = bad_midway(tmp_path, volume)
    out = tmp_path / "s.zarr"
    plan = dry_run(slices, out, *SMALL, "--scheduler", "local:2")
    rows = int(re.search(r"level 0: \d+ task\(s\) of \d+ slices by (\d+) x", plan).group(1))
    assert 45 <= rows < 90  # a task reads slice 40's rows only below its bad strip
    result = convert(slices, out, *SMALL, "--scheduler", "local:2", "--bad_slices", "zero")
    assert_ok(result)
    assert store_files(out) == store_files(local)
    assert json.loads((out / ".zattrs").read_text())["scrollzarr"]["bad_slices"] == [40]
    # said once, by the worker that found it and by the client
    assert result.stderr.count("slice 40 could not be read by the task for level 0") == 1, result.stderr


@pytest.mark.parametrize("tasks", [2, 6])
def test_a_run_with_a_slice_bad_midway_killed_and_resumed_is_the_local_runs_store(tmp_path, volume, slow_tasks, tasks):
    slices, local = bad_midway(tmp_path, volume)
    out = tmp_path / "s.zarr"
    env = {"PYTHONPATH": str(slow_tasks), **SLOW}
    process = start_conversion(slices, out, "--scheduler", "local:2", "--bad_slices", "zero", env=env)
    wait_for_tasks(out, process, tasks)
    process.kill()
    process.communicate()
    result = convert(slices, out, *SMALL, "--scheduler", "local:2", "--bad_slices", "zero", "--resume")
    assert_ok(result)
    assert store_files(out) == store_files(local)


@pytest.mark.parametrize("resume_on", [("--scheduler", "local:2"), ()], ids=["cluster", "this machine"])
def test_a_run_stopped_once_every_level_0_task_finished_runs_the_tasks_again_on_resume(tmp_path, volume, resume_on):
    """The client is stopped after every level-0 task marked itself finished, before it ran again the tasks
    that wrote voxels below a bad slice's first unreadable row: the resumed run finds and runs them."""
    slices, local = bad_midway(tmp_path, volume)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('SCROLLZARR_STOP_AT_REPAIR'):\n"
        "    import scrollzarr.tasks\n"
        "    def _stop(*args):\n"
        "        os._exit(9)\n"
        "    scrollzarr.tasks._disagreeing = _stop\n"
    )
    out = tmp_path / "s.zarr"
    env = {"PYTHONPATH": str(hook), "SCROLLZARR_STOP_AT_REPAIR": "1"}
    process = start_conversion(slices, out, "--scheduler", "local:2", "--bad_slices", "zero", env=env)
    process.communicate()
    assert process.returncode == 9
    assert finished_tasks(out) == 10  # every level-0 task
    result = convert(slices, out, *SMALL, "--bad_slices", "zero", "--resume", *resume_on)
    assert_ok(result)
    assert store_files(out) == store_files(local)


@pytest.mark.parametrize(
    ("scheduler", "fragments"),
    [
        ("local:0", ["local:N needs a whole number of worker processes"]),
        ("local:two", ["local:N needs a whole number of worker processes"]),
        ("local:2000", ["local:N needs a whole number of worker processes, 1 to 1024"]),
        ("no-such-file.json", ["no such scheduler file", "tcp://HOST:PORT", "DASK_SCHEDULER_ADDRESS"]),
        ("tcp://127.0.0.1:9", ["cannot use the Dask scheduler at tcp://127.0.0.1:9", "start it"]),
        ("foo://bar", ["cannot use the Dask scheduler at foo://bar", "ValueError"]),
        ("tcp://[::1", ["cannot use the Dask scheduler at tcp://[::1"]),
    ],
)
def test_a_bad_scheduler_is_one_line(tmp_path, slices, scheduler, fragments):
    result = convert(slices, tmp_path / "s.zarr", "--scheduler", scheduler)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "s.zarr" / "0").exists()


def test_without_dask_the_scheduler_is_one_line(tmp_path, slices):
    shim = tmp_path / "shim" / "distributed"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no distributed here')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'shim'}{os.pathsep}{ROOT}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scroll_to_ome.py"), str(slices), str(tmp_path / "s.zarr"), "--scheduler",
         "local:2"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert_one_line_error(result, "--scheduler needs dask.distributed", 'pip install "scrollzarr[dask]"')


def faulty_worker(tmp_path: Path, fault: str, **env: str) -> Cluster:
    """A scheduler and one worker that preloads the module ``fault`` (Python source) before it takes tasks: a
    worker as it would be on a machine that lacks the shared file system, or the same scrollzarr."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "scrollzarr_fault.py").write_text(fault)
    cluster = Cluster(tmp_path / "cluster", 0, (faults,), **env)
    cluster.workers.append(cluster.start_worker("--preload", "scrollzarr_fault"))
    return cluster


REFUSE_WRITES = """
import builtins, io, os
_open = io.open
def refuse(path, *args, **kwargs):
    if str(path).startswith(os.environ['SCROLLZARR_FAULT_PREFIX']):
        raise PermissionError(13, 'Permission denied', str(path))
    return _open(path, *args, **kwargs)
builtins.open = io.open = refuse
"""


@pytest.mark.parametrize(
    ("fault", "prefix", "fragments"),
    [
        (REFUSE_WRITES, "output", ["cannot write into the output {out}", "a shared file system"]),
        (REFUSE_WRITES, "input", ["cannot read the input {slices}/00000.tif", "a shared file system"]),
        (
            "import scrollzarr.cluster\nscrollzarr.cluster.__version__ = '0.0.1'\n",
            None,
            ["runs scrollzarr 0.0.1, this machine 0.1.0", "the same version on every worker"],
        ),
        (
            "import sys\nsys.modules['scrollzarr'] = None\n",
            None,
            ["the Dask workers cannot run scrollzarr's tasks", "install scrollzarr 0.1.0"],
        ),
    ],
    ids=["no output", "no input", "another scrollzarr", "no scrollzarr"],
)
def test_a_worker_that_cannot_do_its_part_is_named_before_anything_is_written(
    tmp_path, slices, fault, prefix, fragments
):
    out = tmp_path / "s.zarr"
    env = {} if prefix is None else {"SCROLLZARR_FAULT_PREFIX": str(out if prefix == "output" else slices)}
    cluster = faulty_worker(tmp_path, fault, **env)
    try:
        result = convert(slices, out, "--scheduler", cluster.file)
        assert_one_line_error(result, *(fragment.format(out=out, slices=slices) for fragment in fragments))
        if prefix is not None:
            assert "Dask worker tcp://127.0.0.1:" in result.stderr
        assert not (out / "0").exists()
    finally:
        cluster.stop()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_new_level_on_a_cluster_writes_the_local_runs_levels(layout, slices, volume, local_stores, tmp_path):
    out = tmp_path / "s.zarr"
    assert_ok(scroll_to_ome(slices, out, "--chunk_size", CHUNK, "--nlevels", 1, "--quiet", *LAYOUTS[layout]))
    result = scroll_to_ome(out.parent, out, "--first_new_level", 1, "--nlevels", LEVELS, "--quiet", *SMALL,
                           "--scheduler", "local:2")  # fmt: skip
    assert_ok(result)
    assert store_files(out) == local_stores[layout]
    check_pyramid(out, volume)


def test_a_killed_rebuild_on_a_cluster_is_resumed(slices, volume, local_stores, tmp_path, slow_tasks):
    out = tmp_path / "s.zarr"
    assert_ok(scroll_to_ome(slices, out, "--chunk_size", CHUNK, "--nlevels", 1, "--quiet"))
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(out.parent), str(out), "--first_new_level", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(slow_tasks), str(ROOT)]), **SLOW)
    process = subprocess.Popen(
        [*command, "--nlevels", str(LEVELS), "--quiet", *SMALL, "--scheduler", "local:2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    wait_for_tasks(out, process, 2)
    process.kill()
    process.communicate()
    result = scroll_to_ome(out.parent, out, "--first_new_level", 1, "--nlevels", LEVELS, "--quiet", *SMALL,
                           "--scheduler", "local:2")  # fmt: skip
    assert_one_line_error(result, "unfinished rebuild", "--resume")
    result = scroll_to_ome(out.parent, out, "--first_new_level", 1, "--nlevels", LEVELS, *SMALL, "--resume", "-v")
    assert_ok(result)
    assert re.search(r"level 1: \d+ tasks, [1-9]\d* finished before", result.stderr), result.stderr
    assert store_files(out) == local_stores["zarr 2"]
    check_pyramid(out, volume)


def test_ctrl_c_stops_a_local_cluster_run_in_one_line_and_resume_finishes_it(
    tmp_path, slices, volume, local_stores, slow_tasks
):
    """Ctrl-C reaches the whole process group, the LocalCluster's worker processes too: no traceback from them."""
    out = tmp_path / "s.zarr"
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(slices), str(out), "--chunk_size", str(CHUNK)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(slow_tasks), str(ROOT)]), **SLOW)
    process = subprocess.Popen(
        [*command, "--nlevels", str(LEVELS), "--quiet", *SMALL, "--scheduler", "local:2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    wait_for_tasks(out, process, 2)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted; to continue:" in err and "--resume" in err, err
    assert_ok(convert(slices, out, *SMALL, "--scheduler", "local:2", "--resume"))
    assert store_files(out) == local_stores["zarr 2"]


def test_tasks_left_running_by_a_killed_client_write_nothing_into_a_store_replaced_since(
    tmp_path, slices, volume, local_stores, slow_tasks
):
    """A killed client's running tasks go on on their workers; ``--overwrite`` with another layout meanwhile
    replaces the store, and the old tasks, waking up, must not write their units into it."""
    cluster = Cluster(tmp_path / "cluster", 2, (slow_tasks,), SCROLLZARR_SLOW_FIRST="8", **SLOW)
    try:
        out = tmp_path / "s.zarr"
        process = start_conversion(slices, out, "--scheduler", cluster.file)
        deadline = time.monotonic() + 60
        while not (out / "scrollzarr_tasks").exists():  # the run's tasks are sent
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1)
        process.kill()
        process.communicate()
        sharded = "zarr 3, sharded, blosc-zstd"
        result = convert(slices, out, *LAYOUTS[sharded], *SMALL, "--scheduler", cluster.file, "--overwrite")
        assert_ok(result)
        assert store_files(out) == local_stores[sharded]
        check_pyramid(out, volume)
    finally:
        cluster.stop()


def test_without_a_scheduler_dask_is_not_imported(tmp_path, slices):
    code = (
        "import sys, scroll_to_ome\n"
        f"code = scroll_to_ome.main([{str(slices)!r}, {str(tmp_path / 's.zarr')!r}, '--quiet', '--nlevels', '2'])\n"
        "assert code == 0, code\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('dask', 'distributed')))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "DASK_SCHEDULER_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(env, PYTHONPATH=str(ROOT)), timeout=300
    )
    assert_ok(result)
    assert result.stdout.strip() == "[]", result.stdout


def test_a_port_that_is_not_a_scheduler_is_one_line_not_a_hang(tmp_path, slices):
    """A web server (a dashboard's port, say) takes the connection and never answers Dask's handshake."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"tcp://127.0.0.1:{server.server_address[1]}"
        result = convert(slices, tmp_path / "s.zarr", "--scheduler", address, "--dry_run")
        assert_one_line_error(result, f"no Dask scheduler answered at {address} within 20 s", "not its dashboard's")
    finally:
        server.shutdown()


def test_a_scheduler_without_workers_is_one_line(tmp_path, slices):
    cluster = Cluster(tmp_path / "cluster", 0)
    try:
        result = convert(slices, tmp_path / "s.zarr", "--scheduler", cluster.file)
        assert_one_line_error(result, "no Dask worker joined the scheduler at", "within 60 s", "start workers")
    finally:
        cluster.stop()


def test_an_address_without_its_scheme_is_taken_as_tcp(cluster, slices, local_stores, tmp_path):
    out = tmp_path / "s.zarr"
    assert_ok(convert(slices, out, *SMALL, "--scheduler", cluster.address.removeprefix("tcp://")))
    assert store_files(out) == local_stores["zarr 2"]


def test_a_scheduler_lost_mid_run_is_one_line_and_the_store_resumes(tmp_path, slices, local_stores, slow_tasks):
    cluster = Cluster(tmp_path / "cluster", 2, (slow_tasks,), **SLOW)
    try:
        out = tmp_path / "s.zarr"
        process = start_conversion(slices, out, "--scheduler", cluster.file)
        wait_for_tasks(out, process, 2)
        cluster.scheduler.kill()
        _, err = process.communicate(timeout=300)
        result = subprocess.CompletedProcess(process.args, process.returncode, "", err)
        assert_one_line_error(result, f"lost the Dask scheduler at {cluster.file}", "then continue with --resume")
        assert "tasks already running on the cluster at" in err and "finish on their own" in err
    finally:
        cluster.stop()
    assert_ok(convert(slices, out, *SMALL, "--resume"))
    assert store_files(out) == local_stores["zarr 2"]


# Level-0 tasks that stream their box through the levels below


def dry_run(source: Path, out: Path, *args: object) -> str:
    result = scroll_to_ome(source, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, "--dry_run", *args)
    assert_ok(result)
    return result.stdout


@pytest.mark.parametrize(
    ("name", "args", "written"),
    [
        ("zarr 2", (), 2),
        # a fourth level: built by a task from the stored level 2
        ("zarr 2, a level below level 0's tasks", ("--nlevels", "4", "--max_gb", "1"), 2),
        ("zarr 2, 1 of 2 bytes", ("--obytes", "1"), 2),
        (
            "zarr 3, sharded, blosc-zstd",
            ("--zarr_format", "3", "--shard_shape", "16,32,32", "--compressor", "blosc-zstd"),
            1,
        ),
    ],
)
def test_tasks_writing_several_levels_write_the_local_runs_store(name, args, written, slices, volume, tmp_path):
    local = tmp_path / "local" / "s.zarr"
    local.parent.mkdir()
    assert_ok(scroll_to_ome(slices, local, "--chunk_size", CHUNK, "--nlevels", LEVELS, "--quiet", *args))
    out = tmp_path / "s.zarr"
    assert f"writing levels 0 to {written} (each halved in memory)" in dry_run(
        slices, out, *args, "--scheduler", "local:2"
    )
    assert_ok(
        scroll_to_ome(
            slices, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, "--quiet", *args, "--scheduler", "local:2"
        )
    )
    assert store_files(out) == store_files(local)
    if "--obytes" not in args:
        group = zarr.open_group(str(out), mode="r")
        for level, expected in enumerate(pyramid(volume, LEVELS)):
            np.testing.assert_array_equal(group[str(level)][...], expected)


def test_gaussian_level_0_tasks_write_level_0_only_and_the_local_runs_store(slices, volume, tmp_path):
    args = ("--algorithm", "gaussian")
    local = tmp_path / "local" / "s.zarr"
    local.parent.mkdir()
    assert_ok(scroll_to_ome(slices, local, "--chunk_size", CHUNK, "--nlevels", LEVELS, "--quiet", *args))
    out = tmp_path / "s.zarr"
    plan = dry_run(slices, out, *args, "--scheduler", "local:2")
    assert "writing levels" not in plan and "level 1: " in plan and "from the stored level 0" in plan
    assert_ok(
        scroll_to_ome(
            slices, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, "--quiet", *args, "--scheduler", "local:2"
        )
    )
    assert store_files(out) == store_files(local)


def test_odd_edges_in_every_axis_give_the_reference_pyramid(tmp_path):
    """A volume whose sizes are odd at every level, so that a task's last box is halved with padding."""
    z, y, x = np.mgrid[0:67, 0:83, 0:45]
    volume = ((z * 977 + y * 131 + x * 17) % 65521).astype(np.uint16)
    source = tmp_path / "slices"
    write_stack(source, volume, compression="zlib")
    out = tmp_path / "s.zarr"
    assert "writing levels 0 to" in dry_run(source, out, "--scheduler", "local:2", "--nlevels", 4)
    assert_ok(scroll_to_ome(source, out, "--chunk_size", CHUNK, "--nlevels", 4, "--quiet", "--scheduler", "local:2"))
    group = zarr.open_group(str(out), mode="r")
    for level, expected in enumerate(pyramid(volume, 4)):
        np.testing.assert_array_equal(group[str(level)][...], expected)


EVERY_LEVEL = ("--max_gb", "1")  # after SMALL: tasks of level 0 that write every level


def stopped_with_tasks_of_every_level(slices: Path, out: Path, slow_tasks: Path) -> list[Path]:
    """A run on local:2 whose level-0 tasks write every level, killed once two tasks finished; their markers."""
    process = start_conversion(
        slices, out, "--scheduler", "local:2", *EVERY_LEVEL, env={"PYTHONPATH": str(slow_tasks), **SLOW}
    )
    wait_for_tasks(out, process, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return sorted((out / "scrollzarr_tasks").rglob("*.json"))


def test_a_damaged_lower_level_chunk_of_a_finished_level_0_task_is_written_again_on_resume(
    tmp_path, slices, volume, local_stores, slow_tasks
):
    out = tmp_path / "s.zarr"
    markers = stopped_with_tasks_of_every_level(slices, out, slow_tasks)
    assert markers and all(marker.parent.name == "0" for marker in markers)  # level-0 tasks write level 1 too
    boxes = [[tuple(map(int, side.split("-"))) for side in marker.stem.split("_")] for marker in markers]
    # a level-1 chunk of a finished task, at a place that is not that task's in level-0 coordinates (a wrong
    # task forgotten on resume leaves the chunk unwritten)
    damaged = next(
        path
        for path in sorted((out / "1").rglob("*"))
        if path.is_file() and not path.name.startswith(".")
        for corner in [[CHUNK * int(part) for part in path.relative_to(out / "1").parts]]
        for box in boxes
        if all(a // 2 <= c < -(-b // 2) for (a, b), c in zip(box, corner, strict=True))
        and not all(a <= c < b for (a, b), c in zip(box, corner, strict=True))
    )
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = scroll_to_ome(slices, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, *EVERY_LEVEL, "--resume", "-v")
    assert_ok(result)
    assert re.search(rf"chunk file \S*{re.escape(damaged.name)} is damaged", result.stderr), result.stderr
    assert store_files(out) == local_stores["zarr 2"]


def test_workers_that_cannot_take_the_runs_work_stop_it_in_one_line_and_it_resumes(tmp_path, slices, local_stores):
    """A worker that cannot install what every task needs (here its unpickling fails, as for a worker lost but
    not yet dropped by the scheduler) stops the run before any task, in one line; the store resumes elsewhere."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scrollzarr_nojob.py").write_text(
        "import scrollzarr.clustershared\n"
        "def refuse(self, state):\n"
        "    raise RuntimeError('this worker refuses the job')\n"
        "scrollzarr.clustershared.Shared.__setstate__ = refuse\n"
    )
    cluster = Cluster(tmp_path / "cluster", 2, (broken,), DASK_DISTRIBUTED__WORKER__PRELOAD='["scrollzarr_nojob"]')
    try:
        out = tmp_path / "s.zarr"
        result = convert(slices, out, *SMALL, "--scheduler", cluster.file)
        assert_one_line_error(
            result, "could not send the run's work to every Dask worker of", "then continue with --resume"
        )
        assert finished_tasks(out) == 0
    finally:
        cluster.stop()
    assert_ok(convert(slices, out, *SMALL, "--scheduler", "local:2", "--resume"))
    assert store_files(out) == local_stores["zarr 2"]


def test_a_marker_of_a_task_that_wrote_other_levels_is_not_taken_as_finished(
    tmp_path, slices, local_stores, slow_tasks
):
    out = tmp_path / "s.zarr"
    markers = stopped_with_tasks_of_every_level(slices, out, slow_tasks)
    marker = json.loads(markers[0].read_text())
    assert len(marker["chunks"]) == LEVELS
    # as an earlier version's task of the same box that wrote level 0 only would have marked it
    markers[0].write_text(json.dumps({**marker, "chunks": marker["chunks"][0]}))
    result = scroll_to_ome(slices, out, "--chunk_size", CHUNK, "--nlevels", LEVELS, *EVERY_LEVEL, "--resume", "-v")
    assert_ok(result)
    assert re.search(rf"level 0: \d+ tasks, {len(markers) - 1} finished before", result.stderr), result.stderr
    assert store_files(out) == local_stores["zarr 2"]
