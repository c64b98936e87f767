"""Benchmark ppm_to_layers: samples per second, beside the time it takes just to read the chunks it touches.

Uses the scroll_to_ome benchmark's synthetic scroll (bench/data/plain_Z_Y_X, generated if missing),
converted once to OME-Zarr, and a .ppm that follows the scroll's sheet, its rows sweeping the slices up
and down (default 2304 x 16000 pixels, all mapped: 65 layers are 4.8 GB, more than 4 GiB). With the
volume in the page cache it measures, in one run: the I/O floor (reading every chunk the segment
touches, with ``cat`` and through zarr with 2 threads), then ppm_to_layers with its defaults and a
stacked image, with ``--workers 1``, with ``--zarr_cache_max_size_gb 1``, the same surface as a tifxyz
folder, and the volume fetched from a local web server that answers each request after 20 ms
(tests/dataserver.py; ``--cache_gb 0``, so that every chunk crosses the network). For each: wall,
user+sys CPU, peak resident memory of the process tree, samples per second (layers x mapped pixels /
wall), chunk reads against distinct chunks, and the ratio of wall to the floor. Every run's layers
and stacked image are checked identical to the default run's (the tifxyz run's normals come from the
grid, so its files differ). Then the sampling kernels alone, numpy's and the compiled one, on one thread.

Usage: python bench/bench_ppm_to_layers.py [--shape Z Y X] [--rows H] [--width W] [--repeats N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
import zarr

from scrollzarr.ppm import write_ppm
from scrollzarr.synthetic import sheet_surface

from measure import HERE, ROOT, Sample, ensure_stack, machine, median_sample, publish, run_once, warm_file

sys.path.insert(0, str(ROOT / "tests"))
from dataserver import data_server  # the tests' web server, with latency

SCRIPT = [sys.executable, str(ROOT / "ppm_to_layers.py")]
LAYERS = 65
LATENCY = 0.020  # seconds before the web server answers each request


def ensure_store(tiffs: Path, store: Path) -> None:
    marker = store / ".bench_complete"
    if marker.exists():
        return
    print(f"converting {tiffs} to {store} ...", file=sys.stderr, flush=True)
    command = [sys.executable, str(ROOT / "scroll_to_ome.py"), str(tiffs), str(store), "--overwrite"]
    subprocess.run(command, check=True)
    marker.write_text("done\n")


def ensure_ppm(path: Path, shape: tuple[int, int, int], rows: int, width: int) -> None:
    if path.exists():
        return
    print(f"writing {path} ...", file=sys.stderr, flush=True)
    sweep = np.concatenate([np.arange(shape[0]), np.arange(shape[0])[::-1]]).astype(np.float64)
    zs = np.resize(sweep, rows)
    write_ppm(path, sheet_surface(shape, zs, width))


def touched_chunks(ppm: Path, rows: int, width: int, chunk: int, step: int = 8) -> set[tuple[int, int, int]]:
    """Chunks holding the samples of every ``step``-th pixel and layer, and their trilinear neighbours."""
    header = ppm.read_bytes()[:4096]
    offset = header.index(b"<>\n") + 3
    data = np.memmap(ppm, dtype="<f8", mode="r", offset=offset, shape=(rows, width, 6))[::step, ::step]
    found: set[tuple[int, int, int]] = set()
    for band in range(0, data.shape[0], 64):
        part = np.asarray(data[band : band + 64]).reshape(-1, 6)
        part = part[np.any(part[:, 3:] != 0, axis=1)]
        for k in range(0, LAYERS, step):
            points = part[:, 2::-1] + (k - (LAYERS - 1) / 2) * part[:, :2:-1]
            for corner in (0, 1):
                index = np.unique(np.floor(points + corner).astype(np.int64) // chunk, axis=0)
                found.update(map(tuple, index.tolist()))
    return found


def ensure_tifxyz(folder: Path, ppm: Path, rows: int, width: int) -> None:
    """The .ppm's points as a tifxyz folder (float32 x, y, z; scale 1: a grid point per pixel)."""
    if (folder / "meta.json").exists():
        return
    print(f"writing {folder} ...", file=sys.stderr, flush=True)
    header = ppm.read_bytes()[:4096]
    offset = header.index(b"<>\n") + 3
    data = np.memmap(ppm, dtype="<f8", mode="r", offset=offset, shape=(rows, width, 6))
    folder.mkdir(parents=True, exist_ok=True)
    for axis, name in enumerate("xyz"):
        tifffile.imwrite(folder / f"{name}.tif", data[..., axis].astype(np.float32), tile=(256, 256))
    (folder / "meta.json").write_text(json.dumps({"format": "tifxyz", "type": "seg", "scale": [1.0, 1.0]}))


def kernel_rates(store: Path, seconds: float = 3.0) -> tuple[float, float]:
    """M samples/s of the numpy kernel (in a box of level 0) and of the compiled one (in the cached chunks of the
    same voxels), one thread, a sheet of 128 x 128 pixels with 65 layers through them."""
    from scrollzarr import kernel, sampling
    from scrollzarr.chunkcache import ChunkCache

    array = zarr.open_array(store / "0", mode="r")
    lo, hi = np.array([64, 512, 512]), np.array([192, 640, 640])
    box = np.ascontiguousarray(array[64:192, 512:640, 512:640])
    table = ChunkCache(array, 1 << 30).table(lo, hi)
    rng = np.random.default_rng(0)
    count = 128 * 128
    positions = np.stack([np.full(count, 64.0), *(rng.uniform(40, 88, (2, count)))]) + rng.uniform(-1, 1, (3, count))
    positions += lo[:, None]
    normals = np.tile(np.array([[1.0], [0.0], [0.0]]), count)
    offsets = np.arange(LAYERS) - (LAYERS - 1) / 2
    shape = array.shape
    outs = [np.empty((LAYERS, count), box.dtype) for _ in range(2)]
    runs = [
        lambda: sampling.sample_layers(box, lo, positions, normals, offsets, shape, outs[0]),
        lambda: kernel.sample_chunks(table, positions, normals, offsets, shape, outs[1]),
    ]
    rates = []
    for run in runs:
        run()  # compiled, cached
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            run()
            calls += 1
        rates.append(calls * LAYERS * count / (time.perf_counter() - started) / 1e6)
    if not np.array_equal(*outs):
        raise SystemExit("benchmark: the compiled kernel's samples differ from the numpy kernel's")
    return rates[0], rates[1]


def read_floor(store: Path, chunks: set[tuple[int, int, int]]) -> tuple[Sample, float, int]:
    """``cat`` of the chunk files; zarr reads of the same chunks with 2 threads (seconds); bytes."""
    files = [str(store / "0" / f"{z}/{y}/{x}") for z, y, x in sorted(chunks)]
    files = [f for f in files if os.path.exists(f)]
    nbytes = sum(os.path.getsize(f) for f in files)
    cat = run_once(["cat", *files], durable=False)
    array = zarr.open_array(store / "0", mode="r")
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(array.get_block_selection, sorted(chunks)))
    return cat, time.perf_counter() - started, nbytes


def digest(directory: Path, stack: Path) -> str:
    sha = hashlib.sha256()
    for path in [*sorted(directory.glob("*.tif")), stack]:  # not the run's manifest, which holds file times
        sha.update(path.read_bytes())
    return sha.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 2048, 2048), metavar=("Z", "Y", "X"))
    parser.add_argument("--rows", type=int, default=2304, help="rows of the .ppm")
    parser.add_argument("--width", type=int, default=16000, help="columns of the .ppm")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS_ppm_to_layers.md")
    args = parser.parse_args()
    shape = tuple(args.shape)
    tag = "x".join(map(str, shape))
    tiffs = args.data / f"plain_{tag}"
    store = args.data / f"plain_{tag}.zarr"
    ppm = args.data / f"sheet_{tag}_{args.rows}x{args.width}.ppm"
    ensure_stack(tiffs, shape, masked=False)
    ensure_store(tiffs, store)
    ensure_ppm(ppm, shape, args.rows, args.width)
    work = args.data / "out"
    work.mkdir(exist_ok=True)
    layers_dir, stack = work / "layers", work / "stack.tif"
    level0 = store / "0"

    print("finding the chunks the segment touches ...", file=sys.stderr, flush=True)
    grid = [-(-n // 128) for n in shape]
    chunks = {
        c
        for c in touched_chunks(ppm, args.rows, args.width, 128)
        if all(0 <= i < g for i, g in zip(c, grid, strict=False))
    }
    for path in sorted(level0.rglob("*")):
        if path.is_file():
            warm_file(path)
    cat, zarr_seconds, floor_bytes = read_floor(store, chunks)

    surface = args.data / f"sheet_{tag}_{args.rows}x{args.width}.tifxyz"
    ensure_tifxyz(surface, ppm, args.rows, args.width)
    server = data_server(store.parent, latency=LATENCY)
    served = server.__enter__()
    url = f"{served.url}/{store.name}"
    runs = [
        ("ppm_to_layers (default: 2 workers, cache 8 GB)", ppm, store, [], 8.0),
        ("--workers 1", ppm, store, ["--workers", "1"], 8.0),
        ("--zarr_cache_max_size_gb 1", ppm, store, ["--zarr_cache_max_size_gb", "1"], 1.0),
        ("tifxyz surface (the same points)", surface, store, [], 8.0),
        (f"volume over HTTP, {LATENCY * 1000:.0f} ms a request", ppm, url, ["--cache_gb", "0"], 8.0),
    ]
    rows = []
    reference = None
    log = work / "ppm_to_layers.log"
    for name, source, volume, extra, cache_gb in runs:
        samples = []
        for _ in range(args.repeats):
            shutil.rmtree(layers_dir, ignore_errors=True)
            stack.unlink(missing_ok=True)
            os.sync()
            warm_file(ppm)
            print(f"{name} ...", file=sys.stderr, flush=True)
            command = [*SCRIPT, str(source), str(volume), str(layers_dir), str(stack), *extra]
            samples.append(run_once(command, False, log))
            text = log.read_text()
        hash_ = digest(layers_dir, stack)
        reference = reference or hash_
        if hash_ != reference and source == ppm:
            raise SystemExit(f"benchmark: the layers of '{name}' differ from the default run's")
        if not rows:
            local_wall = median_sample(samples).wall
        sample = median_sample(samples)
        wall, cpu, peak = sample.wall, sample.cpu, sample.peak_rss
        mapped = int(re.search(r"(\d+) of \d+ pixels mapped", text).group(1))
        reads, distinct = map(int, re.search(r"(\d+) chunk reads of (\d+) different", text).group(1, 2))
        rate = LAYERS * mapped / wall / 1e6
        rows.append(
            f"| {name} | {wall:.1f} | {cpu:.1f} | {peak / 2**30:.2f} (bound {cache_gb + 1:.0f}) | {rate:.1f} | "
            f"{reads} / {distinct} | {wall / cat.wall:.1f} | {wall / local_wall:.2f} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    server.__exit__(None, None, None)
    numpy_rate, compiled_rate = kernel_rates(store)
    output_bytes = sum(p.stat().st_size for p in layers_dir.iterdir()) + stack.stat().st_size
    shutil.rmtree(layers_dir)
    stack.unlink()
    publish(
        [
            f"# ppm_to_layers benchmark\n\nMachine: {machine()}\n",
            f"Volume: synthetic scroll {shape[0]} x {shape[1]} x {shape[2]} (z, y, x) uint16, OME-Zarr of "
            f"scroll_to_ome (128 chunks), in the page cache. Segment: {args.rows} x {args.width} pixels along "
            f"the sheet, {mapped} mapped, {LAYERS} layers: {LAYERS * mapped / 1e9:.2f} G samples, "
            f"{output_bytes / 2**30:.2f} GiB of layer and stacked TIFFs written. "
            f"Median of {args.repeats} run(s). Every run's TIFFs are identical to the default run's, but the "
            "tifxyz run's (its normals come from the grid).\n",
            f"I/O floor: the {len(chunks)} chunks the segment touches (estimated from every 8th pixel and "
            f"layer; {floor_bytes / 2**30:.2f} GiB on disk, all-zero chunks have no file): `cat` "
            f"{cat.wall:.2f} s, zarr `get_block_selection` with 2 threads {zarr_seconds:.2f} s.\n",
            "| run | wall s | CPU s | peak RSS GiB | M samples/s | chunk reads / distinct | x floor (cat) "
            "| x default |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"Sampling kernels alone, one thread, 65 layers of 128 x 128 pixels in 128³ voxels: numpy "
            f"{numpy_rate:.1f} M samples/s (in a box of them), compiled (numba) {compiled_rate:.1f} M samples/s "
            "(in the cached chunks) "
            f"({compiled_rate / numpy_rate:.1f}x).",
        ],
        args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
