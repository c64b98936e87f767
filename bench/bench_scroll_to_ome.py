"""Benchmark scroll_to_ome against copying the same TIFFs, in one run.

Generates a synthetic scroll (plain uncompressed TIFFs and a masked, zlib-compressed
variant; kept in bench/data/ between runs), then times, several times each, ``cat``
and ``cp -r`` of the input, and scroll_to_ome with its defaults, with ``--max_gb`` at
1/4 and 1/8 of what the default run needs, with one worker, on half the slices, and
on the masked variant. Each run is measured twice over: with the input in the page
cache and no sync, and "durable": input dropped from the page cache (where the
machine allows) and the run followed by ``sync``, timed together.  The repeats go
round robin over the runs, so that a slow spell of a noisy machine falls on all.

For each: the median wall time, user+sys CPU, peak resident memory, bytes read
through read calls, MB/s of input, and the ratio to ``cp -r`` of the same input.
The markdown table goes to stdout and to bench/RESULTS.md.

Usage: python bench/bench_scroll_to_ome.py [--shape Z Y X] [--repeats N] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from measure import HERE, ROOT, Sample, drop_page_cache, ensure_stack, machine, median_sample, publish, run_once, warm

SCRIPT = [sys.executable, str(ROOT / "scroll_to_ome.py"), "--quiet"]


def measure_once(command: list[str], output: Path | None, source: Path, durable: bool) -> Sample:
    """One run, starting with no output and, if durable, a cold cache (else the input read once before)."""
    if output is not None and output.exists():
        shutil.rmtree(output)
    os.sync()
    if durable:
        drop_page_cache()
    else:
        warm(source)
    sample = run_once(command, durable)
    if output is not None and output.exists():
        shutil.rmtree(output)
    os.sync()
    return sample


def tiffs(directory: Path) -> list[str]:
    return [str(p) for p in sorted(directory.glob("*.tif"))]


def default_need(source: Path, output: Path) -> int:
    """Bytes the default run plans for its buffers (from its verbose dry run)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scroll_to_ome.py"), str(source), str(output), "--dry_run", "--verbose"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(re.search(r"memory: (\d+) bytes", result.stderr).group(1))


def check_output_matches(reference: Path, candidate: Path) -> None:
    """Every level of ``candidate`` equals that of ``reference`` (a default run)."""
    first, second = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(candidate), mode="r")
    for name in sorted(first.array_keys()):
        if not np.array_equal(first[name][...], second[name][...]):
            raise SystemExit(f"benchmark: level {name} of {candidate} differs from the default run")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 2048, 2048), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=HERE / "data", help="where the synthetic stacks are kept")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    shape = tuple(args.shape)
    tag = "x".join(map(str, shape))
    plain, masked = args.data / f"plain_{tag}", args.data / f"masked_{tag}"
    ensure_stack(plain, shape, masked=False)
    ensure_stack(masked, shape, masked=True)
    work = args.data / "out"
    work.mkdir(exist_ok=True)
    out = work / "scroll.zarr"
    need = default_need(plain, out)
    half = f",,:{shape[0] // 2}"
    runs = [
        ("cp -r", ["cp", "-r", str(plain), str(work / "copy")], work / "copy", plain),
        ("cat", ["cat", *tiffs(plain)], None, plain),
        ("scroll_to_ome (default)", [*SCRIPT, str(plain), str(out)], out, plain),
        (
            "--max_gb 1/4 of default need",
            [*SCRIPT, str(plain), str(out), "--max_gb", str(need / 4 / 2**30)],
            out,
            plain,
        ),
        (
            "--max_gb 1/8 of default need",
            [*SCRIPT, str(plain), str(out), "--max_gb", str(need / 8 / 2**30)],
            out,
            plain,
        ),
        ("--workers 1", [*SCRIPT, str(plain), str(out), "--workers", "1"], out, plain),
        ("half the slices", [*SCRIPT, str(plain), str(out), f"--ranges={half}"], out, plain),
        ("cp -r (masked, zlib)", ["cp", "-r", str(masked), str(work / "copy")], work / "copy", masked),
        ("masked (zlib), default", [*SCRIPT, str(masked), str(out)], out, masked),
        ("masked (zlib), --workers 1", [*SCRIPT, str(masked), str(out), "--workers", "1"], out, masked),
    ]
    can_drop = drop_page_cache()
    input_bytes = {source: sum(p.stat().st_size for p in source.glob("*.tif")) for source in (plain, masked)}
    rows = []
    for durable in (False, True):
        mode = ("durable, cold input" if can_drop else "durable, warm input") if durable else "page cache"
        # round robin, so that a slow spell of a noisy machine is shared by every run instead of hitting one
        samples: dict[str, list[Sample]] = {name: [] for name, *_ in runs}
        for repeat in range(args.repeats):
            print(f"{mode}: round {repeat + 1} of {args.repeats} ...", file=sys.stderr, flush=True)
            for name, command, output, source in runs:
                samples[name].append(measure_once(command, output, source, durable))
        copy_wall: dict[Path, float] = {}
        for name, _, _, source in runs:
            sample = median_sample(samples[name])
            if name.startswith("cp -r"):
                copy_wall[source] = sample.wall
            size = input_bytes[source] / (2 if name == "half the slices" else 1)
            rows.append(
                f"| {mode} | {name} | {sample.wall:.2f} | {sample.cpu:.2f} | {sample.peak_rss / 2**30:.2f} | "
                f"{sample.read / 2**30:.2f} | {size / sample.wall / 1e6:.0f} | {sample.wall / copy_wall[source]:.2f} |"
            )
    check_runs = [("--max_gb 1/8", ["--max_gb", str(need / 8 / 2**30)]), ("--workers 1", ["--workers", "1"])]
    subprocess.run([*SCRIPT, str(plain), str(out)], check=True)
    for name, extra in check_runs:
        other = work / "other.zarr"
        subprocess.run([*SCRIPT, str(plain), str(other), "--overwrite", *extra], check=True)
        check_output_matches(out, other)
        shutil.rmtree(other)
        print(f"{name}: output identical to the default run", file=sys.stderr)
    shutil.rmtree(out)
    publish(
        [
            f"# scroll_to_ome benchmark\n\nMachine: {machine()}\n",
            f"Input: synthetic scroll of {shape[0]} slices of {shape[1]} x {shape[2]} uint16 "
            f"({input_bytes[plain] / 2**30:.2f} GiB plain; masked variant zlib-compressed, "
            f"{input_bytes[masked] / 2**30:.2f} GiB). Default need: {need / 2**30:.2f} GiB. "
            f"Median of {args.repeats} runs, taken round robin; CPU = user + sys; "
            "RSS = peak resident memory of the process tree; "
            "read = bytes through read calls (page cache included); MB/s = input bytes / wall; "
            "x cp = wall / wall of `cp -r` of the same input in the same mode. The lower-memory and "
            "one-worker outputs were checked equal to the default run's.\n",
            "| mode | run | wall s | CPU s | peak RSS GiB | read GiB | MB/s | x cp -r |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ],
        args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
