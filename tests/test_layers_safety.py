"""ppm_to_layers loses nothing and never leaves output that looks finished and is not.

What ``--overwrite`` may remove (only what an earlier run recorded in its
manifest), paths that collide, two runs on one directory, flushing before
renames, damaged chunks, absurd options, and the promises of the README that
only show on surfaces or sizes the other tests never reach.  Every test runs
the real script (in-process constants lowered only where said, in a real child
process) and compares with tests/reference.py.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from scrollzarr.ppm import write_ppm

from conftest import ROOT, assert_ok, assert_one_line_error, run_script, write_stack
from reference import layers_reference

SHAPE = (16, 20, 24)  # z, y, x
MANIFEST = ".scrollzarr-layers.json"
STRACE = shutil.which("strace")


def strace() -> str:
    """strace's path.  Missing: the test is skipped where the user is not root, and fails as root (as in CI,
    which installs it), so that the system-call checks cannot go unchecked in silence."""
    if STRACE is None:
        if os.geteuid() == 0:
            pytest.fail("strace is not installed (running as root, so the system-call tests must run)")
        pytest.skip(f"strace is not installed (running as uid {os.geteuid()})")
    return STRACE


def ppm_to_layers(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("ppm_to_layers.py", *args)


def ppm_to_layers_patched(patch: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run the script in a child process after the Python statements ``patch`` (which lower a constant)."""
    code = f"import runpy, sys\n{patch}\nsys.argv = {[str(ROOT / 'ppm_to_layers.py'), *map(str, args)]!r}\n"
    code += "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(7).integers(1, 60000, size=SHAPE, dtype=np.uint16)


@pytest.fixture(scope="module")
def store(tmp_path_factory, volume) -> Path:
    """An uncompressed OME-Zarr (one level, chunks of 8), each chunk one plain file."""
    path = tmp_path_factory.mktemp("vol") / "v.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=2)
    group.create_array("0", data=volume, chunks=(8, 8, 8), compressors=None)
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    return path


def surface(height: int, width: int, normal_length: float = 1.0, seed: int = 3) -> np.ndarray:
    """Random points well inside the volume with random normals of ``normal_length`` voxels (x, y, z, nx, ny, nz)."""
    rng = np.random.default_rng(seed)
    z, y, x = SHAPE
    points = rng.uniform((3, 3, 3), (x - 3, y - 3, z - 3), size=(height, width, 3))
    normals = rng.normal(size=(height, width, 3))
    normals *= normal_length / np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.concatenate([points, normals], axis=-1)


@pytest.fixture
def ppm(tmp_path) -> tuple[Path, np.ndarray]:
    data = surface(6, 5)
    path = tmp_path / "s.ppm"
    write_ppm(path, data)
    return path, data


def layer_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def read_layers(directory: Path) -> np.ndarray:
    return np.stack([tifffile.imread(directory / name) for name in layer_files(directory)])


def assert_matches(layers: np.ndarray, reference: np.ndarray) -> None:
    """Rounded to nearest: at most 0.5 (plus float32 arithmetic) from the exact value."""
    assert np.abs(layers.astype(np.float64) - reference).max() < 0.55


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# 1. --overwrite removes only files an earlier run wrote and recorded.


def test_overwrite_in_a_segment_folder_keeps_the_segments_own_files(tmp_path, store, ppm):
    """A segment folder holds ``20230929220926.tif`` (its render) beside its .ppm: neither is a layer of ours."""
    path, _ = ppm
    segment = tmp_path / "20230929220926"
    segment.mkdir()
    tifffile.imwrite(segment / "20230929220926.tif", np.arange(30, dtype=np.uint16).reshape(5, 6))
    shutil.copy(path, segment / "20230929220926.ppm")
    before = snapshot(segment)
    options = ["--number_of_layers", 3, "--overwrite", "--quiet"]
    assert_ok(ppm_to_layers(segment / "20230929220926.ppm", store, segment, *options))
    after = snapshot(segment)
    for name, content in before.items():
        assert after[name] == content, name
    assert layer_files(segment) == ["00.tif", "01.tif", "02.tif", "20230929220926.ppm", "20230929220926.tif"]


def test_overwrite_on_a_folder_of_slices_deletes_none_of_them(tmp_path, store, ppm, volume):
    path, _ = ppm
    slices = tmp_path / "slices"
    slices.mkdir()
    for name in ("00000.tif", "00001.tif", "07.tif", "1.tif"):
        tifffile.imwrite(slices / name, volume[0])
    before = snapshot(slices)
    assert_ok(ppm_to_layers(path, store, slices, "--number_of_layers", 2, "--overwrite", "--quiet"))
    after = snapshot(slices)
    assert {name: after[name] for name in before} == before
    assert layer_files(slices) == ["00.tif", "00000.tif", "00001.tif", "01.tif", "07.tif", "1.tif"]


def test_the_manifest_names_the_layers_and_overwrite_removes_only_what_it_lists_unchanged(tmp_path, store, ppm):
    path, _ = ppm
    out = tmp_path / "l"
    assert_ok(ppm_to_layers(path, store, out, "--number_of_layers", 9, "--quiet"))
    manifest = json.loads((out / MANIFEST).read_text())
    names = [f"{k:02d}.tif" for k in range(9)]
    assert manifest["layers"] == names and manifest["count"] == 9
    assert (manifest["height"], manifest["width"], manifest["dtype"]) == (6, 5, "uint16")
    tifffile.imwrite(out / "07.tif", np.zeros((2, 2), np.uint8))  # the user's own file now, under a layer's name
    same_size = os.urandom((out / "06.tif").stat().st_size)  # another file of the same size put in its place
    (out / "06.tif").write_bytes(same_size)
    (out / "notes.txt").write_text("mine")
    assert_ok(ppm_to_layers(path, store, out, "--number_of_layers", 5, "--overwrite", "--quiet"))
    assert layer_files(out) == ["00.tif", "01.tif", "02.tif", "03.tif", "04.tif", "06.tif", "07.tif", "notes.txt"]
    assert tifffile.imread(out / "07.tif").shape == (2, 2) and (out / "06.tif").read_bytes() == same_size
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["layers"] == names[:5] and manifest["count"] == 5
    # The manifest of this run lists its own files only: a third run leaves 06.tif and 07.tif too.
    assert_ok(ppm_to_layers(path, store, out, "--number_of_layers", 2, "--overwrite", "--quiet"))
    assert layer_files(out) == ["00.tif", "01.tif", "06.tif", "07.tif", "notes.txt"]


def test_overwrite_after_a_killed_run_removes_its_partial_files_and_the_recorded_layers(tmp_path, store):
    """Run A: 9 layers. Run B (--overwrite, 9 layers) is killed while rendering. Run C: 3 layers.

    B's hidden partial files and A's layers 03-08 were all written by this
    tool and recorded: C leaves exactly its own 3 layers, and the user's files.
    """
    out = tmp_path / "out"
    write_ppm(tmp_path / "small.ppm", surface(4, 3))
    assert_ok(ppm_to_layers(tmp_path / "small.ppm", store, out, "--number_of_layers", 9, "--quiet"))
    (out / ".notes").write_text("mine")
    (out / ".07.tif.partial").write_text("mine too, whatever its name")  # not recorded: kept
    write_ppm(tmp_path / "long.ppm", surface(1500, 1000))
    command = [sys.executable, ROOT / "ppm_to_layers.py", tmp_path / "long.ppm", store, out, "--overwrite"]
    command += ["--number_of_layers", 7, "--workers", 1, "--block_size", 2, "--quiet"]  # tiles of 2: slow
    process = subprocess.Popen(list(map(str, command)), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 60
    while not (out / ".06.tif.partial").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.kill()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert (out / ".05.tif.partial").exists()
    assert_ok(ppm_to_layers(tmp_path / "small.ppm", store, out, "--number_of_layers", 3, "--overwrite", "--quiet"))
    names = sorted(p.name for p in out.iterdir())
    assert names == [".07.tif.partial", ".notes", MANIFEST, "00.tif", "01.tif", "02.tif"]
    assert (out / ".07.tif.partial").read_text() == "mine too, whatever its name"


# 2. Paths that collide are refused before anything is written.


def collisions(tmp_path: Path, store: Path, ppm: Path) -> list[tuple[list[object], str]]:
    out = tmp_path / "out"
    (tmp_path / "link").symlink_to(out / "00.tif")
    (tmp_path / "outlink").symlink_to(out, target_is_directory=True)
    return [
        ([out, ppm], "is the .ppm"),
        ([out, store / "stack.tif"], "inside the zarr store"),
        ([out, store / "0" / "stack.tif"], "inside the zarr store"),
        ([out, out / "00.tif"], "is also a layer TIFF"),
        ([out, out], "is OUTPUT_TIFF_DIR"),
        ([out, out / ".." / "out" / "02.tif"], "is also a layer TIFF"),
        ([out, tmp_path / "link"], "is also a layer TIFF"),
        ([tmp_path / "outlink", out / "01.tif"], "is also a layer TIFF"),
        ([out, out / ".scrollzarr-layers.json"], "is also a record ppm_to_layers keeps in OUTPUT_TIFF_DIR"),
        ([out, out / ".scrollzarr.lock"], "is also a record ppm_to_layers keeps in OUTPUT_TIFF_DIR"),
        ([store], "inside the zarr store"),
        ([store / "layers"], "inside the zarr store"),
        ([store / "0"], "inside the zarr store"),
    ]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_outputs_that_collide_with_the_inputs_or_each_other_are_refused(tmp_path, store, ppm, overwrite):
    path, _ = ppm
    copy = tmp_path / "v.zarr"
    shutil.copytree(store, copy)
    zarr_before = snapshot(copy)
    ppm_before = path.read_bytes()
    for outputs, fragment in collisions(tmp_path, copy, path):
        result = ppm_to_layers(path, copy, *outputs, "--number_of_layers", 3, *overwrite)
        assert_one_line_error(result, fragment, code=1)
        assert not (tmp_path / "out").exists(), outputs
        assert snapshot(copy) == zarr_before, outputs
        assert path.read_bytes() == ppm_before


def test_a_ppm_named_like_a_layer_in_the_output_directory_is_refused(tmp_path, store, ppm):
    path, _ = ppm
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(path, folder / "01.tif")
    result = ppm_to_layers(folder / "01.tif", store, folder, "--number_of_layers", 3, "--overwrite")
    assert_one_line_error(result, "the .ppm", "is also a layer TIFF of OUTPUT_TIFF_DIR", code=1)
    assert [p.name for p in folder.iterdir()] == ["01.tif"] and (folder / "01.tif").read_bytes() == path.read_bytes()


# 3. Two runs on one output directory at once.


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path, store):
    write_ppm(tmp_path / "long.ppm", surface(1500, 1000))
    out = tmp_path / "out"
    # Tiles of 2 pixels: the first run lasts far longer than the test needs it to.
    first = [sys.executable, ROOT / "ppm_to_layers.py", tmp_path / "long.ppm", store, out, "--workers", "1"]
    first += ["--block_size", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(list(map(str, first)), stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(out.glob(".*.partial")) and time.monotonic() < deadline:
            time.sleep(0.05)
        small = tmp_path / "small.ppm"
        write_ppm(small, surface(2, 3))
        result = ppm_to_layers(small, store, out, "--overwrite", "--number_of_layers", 3)
        assert process.poll() is None, "the first run ended before the second was tried; make it longer"
        assert_one_line_error(result, "another run is writing the output directory", str(out), code=1)
    finally:
        process.send_signal(signal.SIGTERM)  # not SIGINT: a shell's background job ignores that
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    # The first run kept its partial files for --resume, and nothing under a final name; its lock is gone.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
    assert not (out / ".scrollzarr.lock").exists() and (out / ".scrollzarr-render.json").exists()


def test_two_runs_writing_one_stacked_image_from_other_layer_directories_never_share_it(tmp_path, store):
    """The stacked image may lie outside OUTPUT_TIFF_DIR: a second run writing it is refused while the first
    does (before, both wrote one partial file, and one exited 0 with a stacked image mixed from the two)."""
    write_ppm(tmp_path / "long.ppm", surface(1500, 1000))
    stack = tmp_path / "stacks" / "st.tif"
    first = [sys.executable, ROOT / "ppm_to_layers.py", tmp_path / "long.ppm", store, tmp_path / "A", stack]
    first += ["--workers", "1", "--block_size", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(list(map(str, first)), stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(stack.parent.glob(".*.partial")) and time.monotonic() < deadline:
            time.sleep(0.05)
        small = tmp_path / "small.ppm"
        write_ppm(small, surface(2, 3))
        result = ppm_to_layers(small, store, tmp_path / "B", stack, "--number_of_layers", 3, "--overwrite")
        assert process.poll() is None, "the first run ended before the second was tried; make it longer"
        assert_one_line_error(result, "another run is writing the stacked image", str(stack), code=1)
        assert not (tmp_path / "B").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    # The first run kept its partial stacked image for --resume, and released the stacked image's lock.
    assert sorted(p.name for p in stack.parent.iterdir()) == [".st.tif.partial"]
    # one after the other, both run; a stacked image in OUTPUT_TIFF_DIR itself holds no lock against its own run
    assert_ok(ppm_to_layers(small, store, tmp_path / "B", tmp_path / "B" / "st.tif", "--number_of_layers", 3))
    assert sorted(p.name for p in (tmp_path / "B").iterdir()) == [
        ".scrollzarr-layers.json",
        "00.tif",
        "01.tif",
        "02.tif",
        "st.tif",
    ]


@pytest.mark.parametrize("zarr_only", [False, True])
def test_a_volume_rewritten_while_it_is_read_fails_the_render_and_writes_nothing(tmp_path, volume, zarr_only):
    """scroll_to_ome --overwrite of the store a render reads: chunks vanish and read as zeros, so the render
    must not exit 0 with its layers (before: 48 of 64 rows wrong in every layer, exit 0)."""
    write_stack(tmp_path / "slices", volume)
    store = tmp_path / "v.zarr"
    convert = ["--chunk_size", 8, "--nlevels", 1, "--quiet", *(["--zarr_only"] if zarr_only else [])]
    assert_ok(run_script("scroll_to_ome.py", tmp_path / "slices", store, *convert))
    write_ppm(tmp_path / "long.ppm", surface(120, 100))  # stopped once laid out: it need not be long
    out = tmp_path / "out"
    command = [sys.executable, ROOT / "ppm_to_layers.py", tmp_path / "long.ppm", store, out, "--workers", "1"]
    command += ["--block_size", "2", "--number_of_layers", 3]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    render = subprocess.Popen(list(map(str, command)), stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not any(out.glob(".*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    render.send_signal(signal.SIGSTOP)  # the store is rewritten while the render is in the middle of reading it
    try:
        assert_ok(run_script("scroll_to_ome.py", tmp_path / "slices", store, *convert, "--overwrite"))
    finally:
        render.send_signal(signal.SIGCONT)
    _, stderr = render.communicate(timeout=600)
    assert render.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"error: the volume {store} changed while it was read" in stderr, stderr
    assert "nothing was written: render again" in stderr
    assert not out.exists() or layer_files(out) == []


# 4. Each TIFF is flushed before its rename, each directory after the renames.


def test_tiffs_are_flushed_before_their_rename_and_directories_after(tmp_path, store, ppm):
    path, _ = ppm
    out = tmp_path / "out"
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    log = tmp_path / "trace"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [strace(), "-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2", "-o", log]
    command += [sys.executable, ROOT / "ppm_to_layers.py", path, store, out, stacks / "s.tif", "--number_of_layers", 3]
    assert_ok(subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, timeout=600))
    calls = log.read_text().splitlines()
    flushed: list[str] = []  # paths fsync'ed so far, in order
    renamed: list[str] = []
    for line in calls:
        if fsync := re.search(r"\bf(?:data)?sync\(\d+<([^>]*)>\)\s*=\s*0", line):
            flushed.append(fsync.group(1))
        elif rename := re.search(r'rename(?:at2?)?\(.*?"([^"]*)",.*?"([^"]*)"', line):
            source = rename.group(1)
            if Path(source).parent not in (out, stacks):
                continue  # Python's own renames (its bytecode cache)
            assert source in flushed, f"{source} renamed before it was flushed"
            renamed.append(rename.group(2))
            flushed.append(f"renamed {source}")
    finals = {str(out / f"0{k}.tif") for k in range(3)} | {str(stacks / "s.tif")}
    assert finals <= set(renamed)
    last_rename = max(i for i, entry in enumerate(flushed) if entry.startswith("renamed "))
    after = flushed[last_rename + 1 :]
    assert str(out) in after and str(stacks) in after, after


def test_a_flush_that_fails_leaves_every_earlier_layer_as_it_was(tmp_path, store, ppm):
    """The third TIFF's fsync fails (as ENOSPC can on delayed allocation): no layer may be replaced, none half
    the set.  (Only the TIFFs' flushes are counted: the record's flushes come before them.)"""
    path, _ = ppm
    out = tmp_path / "out"
    assert_ok(ppm_to_layers(path, store, out, "--number_of_layers", 5, "--layer_spacing", 2, "--quiet"))
    before = snapshot(out)
    patch = (
        "import errno, os\n"
        "calls = [0]\n"
        "real = os.fsync\n"
        "def failing(fd):\n"
        "    tiff = os.readlink(f'/proc/self/fd/{fd}').endswith('.tif.partial')\n"
        "    calls[0] += tiff\n"
        "    if tiff and calls[0] == 3:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(fd)\n"
        "os.fsync = failing\n"
    )
    result = ppm_to_layers_patched(patch, path, store, out, "--number_of_layers", 5, "--overwrite")
    assert_one_line_error(result, "no space left on the device", code=1)
    assert snapshot(out) == before


# 5. A damaged chunk.


def test_a_damaged_chunk_is_one_line_naming_it(tmp_path, store, ppm):
    path, _ = ppm
    copy = tmp_path / "v.zarr"
    shutil.copytree(store, copy)
    chunk = copy / "0" / "1.1.1"
    with open(chunk, "r+b") as file:
        file.truncate(100)
    result = ppm_to_layers(path, copy, tmp_path / "out", "--number_of_layers", 3)
    assert_one_line_error(result, str(chunk), "damaged", "scroll_to_ome", code=1)
    assert not (tmp_path / "out").exists()


# 6. Numeric options out of any sane range.


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--zarr_cache_max_size_gb", "1e300"], "--zarr_cache_max_size_gb must be at most"),
        (["--zarr_cache_max_size_gb", "nan"], "--zarr_cache_max_size_gb must be a positive number of GB, not nan"),
        (["--zarr_cache_max_size_gb", "inf"], "--zarr_cache_max_size_gb must be a positive number of GB, not inf"),
        (["--layer_spacing", "1e308"], "--layer_spacing must be at most"),
        (["--layer_spacing", "inf"], "--layer_spacing must be a positive number of voxels, not inf"),
        (["--layer_spacing", "-1"], "--layer_spacing must be a positive number of voxels, not -1.0"),
        (["--block_size", 10**21], "--block_size must be at most"),
        (["--number_of_layers", 10**9], "--number_of_layers 1000000000 with"),
        (["--workers", 10**9], "--workers must be at most 1024, not 1000000000"),
    ],
)
def test_absurd_numbers_are_refused(tmp_path, store, ppm, options, fragment):
    path, _ = ppm
    result = ppm_to_layers(path, store, tmp_path / "out", *options)
    assert_one_line_error(result, fragment, code=2)
    assert not (tmp_path / "out").exists()


def test_more_layers_than_open_files_allowed_is_refused_before_writing(tmp_path, store, ppm):
    path, _ = ppm
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    result = ppm_to_layers(path, store, tmp_path / "out", "--number_of_layers", limit)
    assert_one_line_error(result, f"--number_of_layers {limit} with", f"may open {limit} (ulimit -n)", code=2)
    assert not (tmp_path / "out").exists()


# 7. A header longer than the part read.


def test_a_header_over_64_kib_says_so(tmp_path, store):
    header = "width: 1\nheight: 1\ndim: 6\nordered: true\ntype: double\nversion: 1\n" + "# comment\n" * 7000
    path = tmp_path / "long.ppm"
    path.write_bytes(header.encode() + b"<>\n" + bytes(48))
    result = ppm_to_layers(path, store, tmp_path / "out")
    assert_one_line_error(result, "long.ppm", "header is longer than 64 KiB", code=1)


# 8. README promises nothing else checks.


def test_normals_are_not_renormalised(tmp_path, store, volume):
    data = surface(7, 6, normal_length=2.5)
    write_ppm(tmp_path / "n.ppm", data)
    options = ["--number_of_layers", 5, "--layer_spacing", 0.7, "--quiet"]
    assert_ok(ppm_to_layers(tmp_path / "n.ppm", store, tmp_path / "out", *options))
    layers = read_layers(tmp_path / "out")
    assert_matches(layers, layers_reference(volume, data, 5, 0.7))
    # The same surface with unit normals differs: the test would see a renormalisation.
    unit = data.copy()
    unit[..., 3:] /= 2.5
    assert np.abs(layers - layers_reference(volume, unit, 5, 0.7)).max() > 100


def test_each_chunk_is_read_once_while_it_stays_cached(tmp_path, store, volume):
    """Tiles of 2 pixels over one small region: every tile needs the same chunks again."""
    data = surface(12, 12, seed=5)
    write_ppm(tmp_path / "r.ppm", data)
    log = tmp_path / "trace"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [strace(), "-f", "-y", "-qq", "-e", "trace=openat", "-o", log, sys.executable, ROOT / "ppm_to_layers.py"]
    command += [tmp_path / "r.ppm", store, tmp_path / "out", "--number_of_layers", 3, "--block_size", 2]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, timeout=600)
    assert_ok(result)
    chunk = re.compile(rf"= \d+<({re.escape(str(store / '0'))}/\d+\.\d+\.\d+)>")
    opens = Counter(m.group(1) for line in log.read_text().splitlines() if (m := chunk.search(line)))
    assert len(opens) > 1 and set(opens.values()) == {1}, opens
    reads, distinct = map(int, re.search(r"(\d+) chunk reads of (\d+) different", result.stderr).groups())
    assert reads == distinct == len(opens)
    assert_matches(read_layers(tmp_path / "out"), layers_reference(volume, data, 3, 1.0))


def test_large_voxel_boxes_are_split_and_render_the_same(tmp_path, store, volume):
    """MAX_BOX_VOXELS lowered to 300 in the child: boxes of 16 pixels x 9 layers exceed it and are halved.

    The child records the largest box cut from the volume: a box bigger than
    the bound would mean the split was skipped.
    """
    data = surface(8, 8, normal_length=1.5, seed=9)
    write_ppm(tmp_path / "b.ppm", data)
    patch = (
        "import scrollzarr.layers as layers, scrollzarr.chunkcache as cache, numpy, atexit\n"
        "layers.MAX_BOX_VOXELS = 300\n"
        "largest = [0]\n"
        "box = cache.ChunkCache.box\n"
        "def recording(self, lo, hi):\n"
        "    largest[0] = max(largest[0], int(numpy.prod(hi - lo)))\n"
        "    return box(self, lo, hi)\n"
        "cache.ChunkCache.box = recording\n"
        "atexit.register(lambda: print('largest box', largest[0], file=sys.stderr))\n"
    )
    options = ["--number_of_layers", 9, "--block_size", 4, "--quiet"]
    result = ppm_to_layers_patched(patch, tmp_path / "b.ppm", store, tmp_path / "out", *options)
    assert_ok(result)
    largest = int(re.search(r"largest box (\d+)", result.stderr).group(1))
    assert 0 < largest <= 300
    assert_matches(read_layers(tmp_path / "out"), layers_reference(volume, data, 9, 1.0))


def test_images_over_the_classic_tiff_limit_are_bigtiff(tmp_path, store, ppm, volume):
    """CLASSIC_TIFF_LIMIT lowered to 40 bytes in the child: the 60-byte images must be BigTIFF."""
    path, data = ppm
    patch = "import scrollzarr.layertiff as layertiff\nlayertiff.CLASSIC_TIFF_LIMIT = 40\n"
    options = ["--number_of_layers", 3, "--quiet"]
    assert_ok(ppm_to_layers_patched(patch, path, store, tmp_path / "big", tmp_path / "s.tif", *options))
    assert_ok(ppm_to_layers(path, store, tmp_path / "classic", *options))
    reference = layers_reference(volume, data, 3, 1.0)
    for k in range(3):
        with tifffile.TiffFile(tmp_path / "big" / f"0{k}.tif") as tiff:
            assert tiff.is_bigtiff and len(tiff.pages) == 1
            assert_matches(tiff.asarray()[None], reference[k : k + 1])
        with tifffile.TiffFile(tmp_path / "classic" / f"0{k}.tif") as tiff:
            assert not tiff.is_bigtiff
    with tifffile.TiffFile(tmp_path / "s.tif") as tiff:
        assert tiff.is_bigtiff
        np.testing.assert_array_equal(tiff.asarray(), read_layers(tmp_path / "big").max(axis=0))
