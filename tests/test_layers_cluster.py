"""ppm_to_layers on a Dask cluster (``--scheduler``): the same files as the local render, byte for byte.

A synthetic scroll is converted by scroll_to_ome and a .ppm follows one of
its sheets (with an unmapped hole).  The local render and the cluster's are
run by the real script; their TIFFs are read back as bytes (and the layers
with tifffile against the independent reference of tests/reference.py).  The
clusters are real: a ``LocalCluster`` of worker processes (``local:N``), and
a ``dask scheduler`` with two ``dask worker`` processes started here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from scrollzarr.ppm import write_ppm
from scrollzarr.synthetic import sheet_surface, write_stack

from conftest import ROOT, assert_ok, assert_one_line_error, run_script, scroll_to_ome
from reference import layers_reference

SHAPE = (40, 96, 112)  # z, y, x
# Bands of 8 rows (--block_size 8) over the surface's 40 rows: 5 tasks, each of 38 tiles of 8 columns.
OPTIONS = ["--number_of_layers", 9, "--layer_spacing", 1.5, "--block_size", 8, "--quiet"]
BANDS = 5
MANIFEST = ".scrollzarr-layers.json"


def ppm_to_layers(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if env is None:
        return run_script("ppm_to_layers.py", *args)
    command = [sys.executable, str(ROOT / "ppm_to_layers.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def scroll(tmp_path_factory) -> Path:
    """The synthetic scroll's OME-Zarr (chunks of 32, 2 levels) and a .ppm along its sheet, with a hole."""
    root = tmp_path_factory.mktemp("scroll")
    write_stack(root / "tiffs", SHAPE)
    assert_ok(scroll_to_ome(root / "tiffs", root / "scroll.zarr", "--chunk_size", 32, "--nlevels", 2))
    surface = sheet_surface(SHAPE, np.arange(SHAPE[0], dtype=np.float64), 300)
    surface[10:17, 40:90] = 0
    write_ppm(root / "sheet.ppm", surface)
    np.save(root / "sheet.npy", surface)
    return root


@pytest.fixture(scope="module")
def local(scroll, tmp_path_factory) -> Path:
    """The local render (this machine's threads): layers in ``layers/``, the stacked image ``stack.tif``."""
    out = tmp_path_factory.mktemp("local")
    result = ppm_to_layers(scroll / "sheet.ppm", scroll / "scroll.zarr", out / "layers", out / "stack.tif", *OPTIONS)
    assert_ok(result)
    return out


def image_files(directory: Path) -> dict[str, bytes]:
    """Every file of a layer directory but the run's record, with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.name != MANIFEST}


def assert_same_render(local: Path, out: Path) -> None:
    """``out`` holds exactly the local render's files, byte for byte, and a finished record."""
    expected = image_files(local / "layers")
    assert sorted(expected) == [f"{k:02d}.tif" for k in range(9)]
    assert image_files(out / "layers") == expected
    assert (out / "stack.tif").read_bytes() == (local / "stack.tif").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["layers", "stack.tif"]  # no partial file, no lock left
    record = json.loads((out / "layers" / MANIFEST).read_text())
    assert record["layers"] == sorted(expected) and record["partial"] == {}


def test_a_local_cluster_renders_the_local_files_byte_for_byte(scroll, local, tmp_path):
    result = ppm_to_layers(
        scroll / "sheet.ppm",
        scroll / "scroll.zarr",
        tmp_path / "layers",
        tmp_path / "stack.tif",
        *OPTIONS[:-1],
        "--scheduler",
        "local:2",
    )
    assert_ok(result)
    assert f"{BANDS} band(s) of 8 rows rendered" in result.stderr
    assert "Dask cluster at local:2: 2 worker(s)" in result.stderr
    assert_same_render(local, tmp_path)
    # and the render is the definition's (independent trilinear reference), hole and all
    surface = np.load(scroll / "sheet.npy")
    volume = zarr.open_array(scroll / "scroll.zarr" / "0", mode="r")[:]
    layers = np.stack([tifffile.imread(tmp_path / "layers" / f"{k:02d}.tif") for k in range(9)])
    reference = layers_reference(volume, surface, 9, 1.5)
    assert np.abs(layers - reference).max() < 0.55
    assert not layers[:, 10:17, 40:90].any()


def test_the_summary_counts_what_the_local_render_counts(scroll, tmp_path):
    """Pixels mapped, and chunk reads: each process keeps one cache for every band it renders (local:1, one
    process, reads each chunk once, as the local render does)."""
    summaries = []
    for where, extra in (("here", []), ("cluster", ["--scheduler", "local:1"])):
        result = ppm_to_layers(scroll / "sheet.ppm", scroll / "scroll.zarr", tmp_path / where, *OPTIONS[:-1], *extra)
        assert_ok(result)
        mapped = re.search(r"\d+ of \d+ pixels mapped; [\d.]+ M samples", result.stderr)
        reads = re.search(r"\d+ chunk reads of \d+ different chunks \(.*\)", result.stderr)
        assert mapped and reads, result.stderr
        summaries.append((mapped.group(), reads.group()))
    assert summaries[0] == summaries[1], summaries


@pytest.mark.parametrize(
    ("address", "fragments"),
    [
        ("local:0", ["--scheduler local:0", "local:N needs a whole number of worker processes, 1 to 1024"]),
        ("local:two", ["--scheduler local:two", "local:N needs a whole number"]),
        (
            "no-such-scheduler.json",
            ["scheduler no-such-scheduler.json (--scheduler", "no such scheduler file", "tcp://HOST:PORT"],
        ),
        ("tcp://127.0.0.1:9", ["cannot use the Dask scheduler at tcp://127.0.0.1:9", "check --scheduler"]),
    ],
)
def test_a_scheduler_that_cannot_be_used_is_one_line_and_nothing_is_written(scroll, tmp_path, address, fragments):
    out = tmp_path / "out"
    result = ppm_to_layers(scroll / "sheet.ppm", scroll / "scroll.zarr", out, "--scheduler", address)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_a_band_that_fails_for_good_is_one_line_naming_its_rows_and_nothing_is_written(scroll, tmp_path):
    """Every chunk file of level 0 a symbolic link to itself: reading one fails (ELOOP) on every try."""
    broken = tmp_path / "broken.zarr"
    (broken / "0").mkdir(parents=True)
    source = zarr.open_group(scroll / "scroll.zarr", mode="r")
    for name in (".zgroup", ".zattrs"):
        (broken / name).write_bytes((scroll / "scroll.zarr" / name).read_bytes())
    (broken / "0" / ".zarray").write_bytes((scroll / "scroll.zarr" / "0" / ".zarray").read_bytes())
    (broken / "1").symlink_to(scroll / "scroll.zarr" / "1")
    array = source["0"]
    for z, y, x in np.ndindex(*(-(-n // c) for n, c in zip(array.shape, array.chunks, strict=True))):
        link = broken / "0" / str(z) / str(y) / str(x)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(link.name)
    out = tmp_path / "out"
    result = ppm_to_layers(scroll / "sheet.ppm", broken, out, tmp_path / "s.tif", *OPTIONS, "--scheduler", "local:1")
    assert_one_line_error(
        result, "the task for surface rows ", "failed on the cluster (OSError", "Too many levels of symbolic links",
        "fix the cause, then render again (nothing was written under a final name)",
    )  # fmt: skip
    # no layer, no stacked image, no partial file, no record: the directory the run made is gone again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.zarr"]


def test_without_dask_scheduler_is_one_line_and_without_scheduler_dask_is_not_imported(scroll, local, tmp_path):
    """dask and distributed that cannot be imported (as when the extra is not installed) come first on the path."""
    fake = tmp_path / "no-dask"
    for package in ("dask", "distributed"):
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text(f"raise ImportError('No module named {package}')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]))
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    ppm, store = scroll / "sheet.ppm", scroll / "scroll.zarr"
    result = ppm_to_layers(ppm, store, tmp_path / "cluster", "--scheduler", "local:2", env=env)
    assert_one_line_error(result, "--scheduler needs dask.distributed", 'pip install "scrollzarr[dask]"', code=2)
    assert not (tmp_path / "cluster").exists()
    # DASK_SCHEDULER_ADDRESS stands for --scheduler
    result = ppm_to_layers(ppm, store, tmp_path / "cluster", env=env | {"DASK_SCHEDULER_ADDRESS": "local:2"})
    assert_one_line_error(result, 'pip install "scrollzarr[dask]"', code=2)
    # without either, the render runs here, and imports neither package (either would fail)
    here = tmp_path / "here"
    assert_ok(ppm_to_layers(ppm, store, here / "layers", here / "stack.tif", *OPTIONS, env=env))
    assert_same_render(local, here)


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a Dask process of this test in a session of its own (so that it and its children can be ended)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@dataclass
class Cluster:
    scheduler_file: Path
    workers: list[subprocess.Popen[bytes]]


@contextmanager
def dask_cluster(tmp_path: Path, workers: int, prefix: list[str] | None = None) -> Iterator[Cluster]:
    """``dask scheduler --scheduler-file`` and ``workers`` ``dask worker --nthreads 1``, started here (each worker
    command after ``prefix``); yields them once every worker has joined, and ends them all after."""
    distributed = pytest.importorskip("distributed")
    scheduler_file = tmp_path / "scheduler.json"
    python = sys.executable
    scheduler = [python, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(scheduler_file)]
    scheduler += ["--port", "0", "--no-dashboard", "--dashboard-address", ":0"]
    processes = [start(scheduler, tmp_path / "scheduler.log")]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scheduler_file.exists(), (tmp_path / "scheduler.log").read_text()
        for number in range(workers):
            worker = [python, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file)]
            worker += ["--nthreads", "1", "--no-dashboard", "--local-directory", str(tmp_path / f"w{number}")]
            processes.append(start([*(prefix or []), *worker], tmp_path / f"worker{number}.log"))
        with distributed.Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(workers, timeout=60)
        yield Cluster(scheduler_file, processes[1:])
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def test_a_dask_scheduler_and_two_workers_render_the_local_files_byte_for_byte(scroll, local, tmp_path):
    """``dask scheduler --scheduler-file`` and two ``dask worker --nthreads 1``, started here; the render is
    given the scheduler file, and run from another directory (the paths the workers get are absolute)."""
    with dask_cluster(tmp_path, 2) as cluster:
        scheduler_file = cluster.scheduler_file
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        command = [sys.executable, str(ROOT / "ppm_to_layers.py"), scroll / "sheet.ppm", scroll / "scroll.zarr"]
        command += ["../out/layers", "../out/stack.tif", *OPTIONS[:-1], "--scheduler", scheduler_file]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, cwd=elsewhere)
        assert_ok(result)
        assert "2 worker(s), 1 task(s) at once each" in result.stderr
        assert f"{BANDS} band(s) of 8 rows rendered" in result.stderr
        assert_same_render(local, tmp_path / "out")


def test_a_worker_killed_mid_render_loses_nothing(scroll, tmp_path):
    """Two workers; one is killed (its process group, SIGKILL) while bands are running: Dask runs its band again
    on the other, and the files are the local render's.  A surface of 640 rows in bands of 4 (160 tasks) keeps
    the render going for several seconds (160 rows, with the layers written by direct I/O, ended within the
    second the test waited)."""
    surface = np.load(scroll / "sheet.npy")
    write_ppm(tmp_path / "long.ppm", np.concatenate([surface, surface[::-1]] * 8))
    options = ["--number_of_layers", 9, "--block_size", 4, "--quiet"]
    inputs = [tmp_path / "long.ppm", scroll / "scroll.zarr"]
    assert_ok(ppm_to_layers(*inputs, tmp_path / "local" / "layers", tmp_path / "local" / "stack.tif", *options))
    out = tmp_path / "cluster"
    with dask_cluster(tmp_path, 2) as cluster:
        command = [sys.executable, str(ROOT / "ppm_to_layers.py"), *inputs, out / "layers", out / "stack.tif"]
        command += [*options, "--scheduler", cluster.scheduler_file]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        render = subprocess.Popen(list(map(str, command)), stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        while not (out / "layers" / ".08.tif.partial").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert render.poll() is None, "the render ended before a worker could be killed"
        os.killpg(cluster.workers[0].pid, signal.SIGKILL)
        _, stderr = render.communicate(timeout=600)
    assert render.returncode == 0, stderr
    assert_same_render(tmp_path / "local", out)


def test_a_worker_that_cannot_see_the_input_or_the_output_is_named_before_anything_is_written(scroll, tmp_path):
    """The worker runs in a mount namespace of its own, where an empty tmpfs hides ``hidden/``: a .ppm there, or
    an output there, is missing for it and present for the render; and where ``readonly/`` is mounted read-only."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("hiding a directory from one process needs root and unshare (a mount namespace)")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    shutil.copy(scroll / "sheet.ppm", hidden / "sheet.ppm")
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mounts = f'mount -t tmpfs none "{hidden}" && mount --bind "{readonly}" "{readonly}"'
    mounts += f' && mount -o remount,bind,ro "{readonly}"'
    hide += [f'{mounts} && exec "$@"', "worker"]
    with dask_cluster(tmp_path, 1, hide) as cluster:
        scheduler_file = cluster.scheduler_file
        store = scroll / "scroll.zarr"
        result = ppm_to_layers(hidden / "sheet.ppm", store, tmp_path / "out", "--scheduler", scheduler_file)
        assert_one_line_error(
            result, "Dask worker tcp://", f"cannot read the input {hidden / 'sheet.ppm'} (No such file or directory)",
            "every worker must see the input and the output at the same paths (a shared file system)",
        )  # fmt: skip
        result = ppm_to_layers(scroll / "sheet.ppm", store, hidden / "out", "--scheduler", scheduler_file)
        assert_one_line_error(
            result, "Dask worker tcp://", f"does not see the output {hidden / 'out'} that the client sees",
            "(a file made there is missing for it)", "at the same paths (a shared file system)",
        )  # fmt: skip
        # hidden/ itself is there for the worker (the empty tmpfs), and writable: but it is not the client's
        result = ppm_to_layers(
            scroll / "sheet.ppm", store, tmp_path / "out", hidden / "stack.tif", "--scheduler", scheduler_file
        )
        assert_one_line_error(result, "Dask worker tcp://", f"does not see the output {hidden} that the client sees")
        result = ppm_to_layers(scroll / "sheet.ppm", store, readonly / "out", "--scheduler", scheduler_file)
        assert_one_line_error(
            result, "Dask worker tcp://", f"cannot write into the output {readonly / 'out'} (Read-only file system)"
        )
    assert list(readonly.iterdir()) == []
    assert sorted(p.name for p in hidden.iterdir()) == ["sheet.ppm"]  # no output made, no lock left
    assert not (tmp_path / "out").exists()


def test_a_band_of_a_stopped_render_writes_nothing_into_the_files_of_the_next(scroll, tmp_path):
    """Dask does not stop a task that is running when its render stops: such a band, finishing later, must not
    write into the files that the next render laid out under the same names.  On a cluster each render marks the
    locks that hold its files before it makes them, and a band checks the mark after it opens each file."""
    from scrollzarr import layers
    from scrollzarr.layertiff import LayerTiff
    from scrollzarr.outputlock import OutputLock
    from scrollzarr.ppm import open_ppm

    out = tmp_path / "out"
    out.mkdir()  # not the lock's to remove at its end
    ppm = open_ppm(scroll / "sheet.ppm")
    with OutputLock(out) as lock:
        image = LayerTiff(out / "00.tif", ppm.height, ppm.width, np.dtype("uint16"))
        before = image.path.read_bytes()
        job = layers.RenderJob(
            run="stopped",
            surface=ppm,
            zarr=scroll / "scroll.zarr",
            level=0,
            layers=1,
            spacing=1.0,
            direction="both",
            stacked=range(1),
            stack_filter="max",
            block_size=8,
            cache_bytes=2**20,
            threads=1,
            images=(image.rows(lock.path),),
            stacked_image=False,
            flip_normals=False,
            remote=True,
        )
        lock.mark("next")
        with pytest.raises(layers.StaleRender, match=r"\.00\.tif\.partial is no longer written by the render this"):
            layers.render_band(job, layers.Band(0, (0, 8)))
        assert image.path.read_bytes() == before
        # while the lock bears its render's mark, the band writes its rows, and only those
        lock.mark("stopped")
        result = layers.render_band(job, layers.Band(1, (8, 16)))
        assert (result.mapped, result.pixels) == (8 * 300 - 6 * 50, 8 * 300)  # rows 10-15 of the hole are unmapped
        written = tifffile.imread(image.path)
        surface = np.load(scroll / "sheet.npy")
        volume = zarr.open_array(scroll / "scroll.zarr" / "0", mode="r")[:]
        reference = layers_reference(volume, surface, 1, 1.0)[0]
        assert np.abs(written[8:16] - reference[8:16]).max() < 0.55
        assert not written[:8].any() and not written[16:].any()
        image.discard()
    # the run is over (its lock file gone): a band still running writes nothing
    image = LayerTiff(out / "00.tif", ppm.height, ppm.width, np.dtype("uint16"))
    with pytest.raises(layers.StaleRender):
        layers.render_band(job, layers.Band(0, (0, 8)))
    assert not tifffile.imread(image.path).any()
    image.discard()


def test_a_local_cluster_renders_layers_on_one_side_as_the_definition_says(scroll, tmp_path):
    """--direction reaches the bands on the workers: layer k at k spacings against the normal's side, negative."""
    options = [*OPTIONS[:-1], "--direction", "negative", "--number_of_stacked_layers", 2]
    result = ppm_to_layers(
        scroll / "sheet.ppm", scroll / "scroll.zarr", tmp_path / "layers", tmp_path / "stack.tif", *options,
        "--scheduler", "local:2",
    )  # fmt: skip
    assert_ok(result)
    surface = np.load(scroll / "sheet.npy")
    volume = zarr.open_array(scroll / "scroll.zarr" / "0", mode="r")[:]
    layers = np.stack([tifffile.imread(tmp_path / "layers" / f"{k:02d}.tif") for k in range(9)])
    assert np.abs(layers - layers_reference(volume, surface, 9, 1.5, direction="negative")).max() < 0.55
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "stack.tif"), layers[7:9].max(axis=0))
