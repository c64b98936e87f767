"""Benchmark decompress_tiffs against libtiff's ``tiffcp -c none`` over the same files, in one run.

Uses the synthetic masked scroll of the scroll_to_ome benchmark (zlib, kept in bench/data/) and an
LZW-compressed copy of it (made here), each 2 GiB uncompressed by default. For each it
times, with the input in the page cache and several times with the median reported: ``tiffcp -c
none`` run file by file (Debian's libtiff-tools), decompress_tiffs with one worker, and with all
workers (the default). Reports wall, user+sys CPU, peak RSS, MB/s of uncompressed output and the
ratios the targets are stated in; checks the outputs' pixels against tiffcp's.

Usage: python bench/bench_decompress_tiffs.py [--shape Z Y X] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile

from measure import HERE, ROOT, Sample, ensure_stack, machine, median_sample, publish, run_once, warm

SCRIPT = [sys.executable, str(ROOT / "decompress_tiffs.py"), "--quiet"]


def ensure_lzw(source: Path, target: Path, count: int) -> None:
    marker = target / ".complete"
    if marker.exists() and marker.read_text() == str(count):
        return
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    print(f"writing {count} LZW slices to {target} ...", file=sys.stderr, flush=True)
    for path in sorted(source.glob("*.tif"))[:count]:
        tifffile.imwrite(target / path.name, tifffile.imread(path), compression="lzw", rowsperstrip=64)
    marker.write_text(str(count))


def measure(command: list[str], source: Path, output: Path, repeats: int) -> Sample:
    samples = []
    for _ in range(repeats):
        shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True)
        os.sync()
        warm(source)
        samples.append(run_once(command, durable=False))
    return median_sample(samples)


def same_pixels(first: Path, second: Path) -> None:
    for path in sorted(first.glob("*.tif")):
        if not np.array_equal(tifffile.imread(path), tifffile.imread(second / path.name)):
            raise SystemExit(f"benchmark: {path.name} differs between {first} and {second}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 2048, 2048), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS_decompress_tiffs.md")
    args = parser.parse_args()
    if shutil.which("tiffcp") is None:
        raise SystemExit("benchmark: tiffcp not found; install libtiff-tools (apt-get install libtiff-tools)")
    shape = tuple(args.shape)
    tag = "x".join(map(str, shape))
    zlib_dir = args.data / f"masked_{tag}"
    ensure_stack(zlib_dir, shape, masked=True)
    lzw_dir = args.data / f"masked_lzw_{tag}"
    ensure_lzw(zlib_dir, lzw_dir, shape[0])
    work = args.data / "out"
    rows = []
    for label, source in (("zlib", zlib_dir), ("LZW", lzw_dir)):
        files = sorted(source.glob("*.tif"))
        uncompressed = sum(tifffile.TiffFile(f).pages.first.nbytes for f in files[:1]) * len(files)
        compressed = sum(f.stat().st_size for f in files)
        out_tiffcp, out_ours = work / "tiffcp", work / "decompressed"
        loop = f'for f in "{source}"/*.tif; do tiffcp -c none "$f" "{out_tiffcp}/${{f##*/}}" || exit 1; done'
        runs = [
            ("tiffcp -c none, file by file", ["sh", "-c", loop], out_tiffcp),
            ("decompress_tiffs --workers 1", [*SCRIPT, str(source), str(out_ours), "--workers", "1"], out_ours),
            ("decompress_tiffs (all workers)", [*SCRIPT, str(source), str(out_ours)], out_ours),
        ]
        walls = {}
        for name, command, output in runs:
            print(f"{label}: {name} ...", file=sys.stderr, flush=True)
            sample = measure(command, source, output, args.repeats)
            walls[name] = sample.wall
            rows.append(
                f"| {label} | {name} | {sample.wall:.2f} | {sample.cpu:.2f} | {sample.peak_rss / 2**30:.2f} | "
                f"{uncompressed / sample.wall / 1e6:.0f} | {sample.wall / walls[runs[0][0]]:.2f} |"
            )
        same_pixels(out_tiffcp, out_ours)
        speedup = walls[runs[1][0]] / walls[runs[2][0]]
        rows.append(f"| {label} | all workers vs 1 worker: **{speedup:.2f} x faster** | | | | | |")
        print(
            f"{label}: {len(files)} files, {compressed / 2**30:.2f} GiB compressed, {uncompressed / 2**30:.2f} GiB out",
            file=sys.stderr,
        )
        shutil.rmtree(work / "tiffcp")
        shutil.rmtree(work / "decompressed")
    publish(
        [
            f"# decompress_tiffs benchmark\n\nMachine: {machine()}\n",
            f"Input: the synthetic masked scroll, {shape[0]} slices of {shape[1]} x {shape[2]} uint16 "
            f"(zlib), and the same slices LZW-compressed; input in the page cache, no sync. "
            f"Median of {args.repeats} runs; CPU = user + sys of the process tree; MB/s = uncompressed bytes / wall; "
            "x tiffcp = wall / wall of `tiffcp -c none` run file by file over the same files. Outputs checked "
            "pixel-equal to tiffcp's.\n",
            "| input | run | wall s | CPU s | peak RSS GiB | MB/s | x tiffcp |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ],
        args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
