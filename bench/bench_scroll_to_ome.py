"""Benchmark scroll_to_ome against copying the same TIFFs, and its output layouts against its default, in one run.

Generates a synthetic scroll (plain uncompressed TIFFs and a masked, zlib-compressed
variant; kept in bench/data/ between runs), then times, several times each, ``cat``
and ``cp -r`` of the input, and scroll_to_ome with its defaults, with ``--max_gb`` at
1/4 and 1/6 of what the default run needs, with one worker, on half the slices, and
on the masked variant. Each run is measured twice over: with the input in the page
cache and no sync, and "durable": input dropped from the page cache (where the
machine allows) and the run followed by ``sync``, timed together.  The repeats go
round robin over the runs, so that a slow spell of a noisy machine falls on all.

For each: the median wall time, user+sys CPU, peak resident memory, bytes read
through read calls, MB/s of input, and the ratio to ``cp -r`` of the same input.
The markdown table goes to stdout and to bench/RESULTS.md.

The layouts suite times, the same way, the output layouts of issue 13 against the
default (zarr 2, uncompressed) in the same rounds: zarr 3 unsharded and sharded,
blosc-lz4, blosc-zstd (clevel 3), zstd and gzip (gzip once, in the first round with
the input in the page cache: it is slow).  For each: the wall time as a ratio to the default run's, the CPU
utilisation (CPU / wall: 2 on two busy cores), the peak resident memory, and the
output's bytes on disk (allocated blocks) as a ratio to the input's bytes.  Every
layout's output (of its first run) is checked equal to the default run's, voxel for voxel.  That table
replaces its own section of bench/RESULTS.md; the settings suite replaces the part
before the first section, so each suite can be run alone.

Usage: python bench/bench_scroll_to_ome.py [--shape Z Y X] [--repeats N] [--suite {settings,layouts,all}]
       [--output FILE]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from measure import HERE, ROOT, Sample, drop_page_cache, ensure_stack, machine, median_sample, run_once, warm

SCRIPT = [sys.executable, str(ROOT / "scroll_to_ome.py"), "--quiet"]


def measure_once(
    command: list[str], output: Path | None, source: Path, durable: bool, after: Callable[[Path], None] | None = None
) -> tuple[Sample, int]:
    """One run, starting with no output and, if durable, a cold cache (else the input read once before);
    its sample and the bytes its output takes on disk.  ``after(output)`` runs, untimed, before the output is
    removed."""
    if output is not None and output.exists():
        shutil.rmtree(output)
    os.sync()
    if durable:
        drop_page_cache()
    else:
        warm(source)
    sample = run_once(command, durable)
    size = disk_bytes(output) if output is not None and output.exists() else 0
    if after is not None and output is not None:
        after(output)
    if output is not None and output.exists():
        shutil.rmtree(output)
    os.sync()
    return sample, size


def disk_bytes(directory: Path) -> int:
    """Bytes the files under ``directory`` take on disk (allocated blocks, as ``du`` counts them)."""
    return sum(p.lstat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


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


# Issue 13's layouts: (name, options beside the default run's, target: wall / wall of the default run, timed in
# every round, else once: in the first round with the input in the page cache).
# The sharded runs take shards one chunk (128 planes) deep, the depth whose memory stays within the default's.
SHARD = "128,1024,1024"
LAYOUTS: list[tuple[str, list[str], float | None, bool]] = [
    ("default (zarr 2, uncompressed)", [], None, True),
    ("zarr 3", ["--zarr_format", "3"], 1.15, True),
    (f"zarr 3, shards {SHARD}", ["--zarr_format", "3", "--shard_shape", SHARD], 1.15, True),
    ("zarr 3, shards 128,2048,2048", ["--zarr_format", "3", "--shard_shape", "128,2048,2048"], 1.15, True),
    ("blosc-lz4 (zarr 2)", ["--compressor", "blosc-lz4"], 1.3, True),
    (
        f"blosc-lz4, zarr 3, shards {SHARD}",
        ["--zarr_format", "3", "--shard_shape", SHARD, "--compressor", "blosc-lz4"],
        1.3,
        True,
    ),
    ("blosc-zstd 3 (zarr 2)", ["--compressor", "blosc-zstd", "--clevel", "3"], 2.0, True),
    ("--preset v3-sharded (blosc-zstd 3)", ["--preset", "v3-sharded"], 2.0, True),
    ("zstd 3 (zarr 2)", ["--compressor", "zstd"], None, True),
    ("gzip 6 (zarr 2), once (slow)", ["--compressor", "gzip"], None, False),
]


def layouts_suite(plain: Path, work: Path, repeats: int, can_drop: bool) -> list[str]:
    """Time every layout of :data:`LAYOUTS` round robin, check its output, and return its section of the report."""
    out = work / "scroll.zarr"
    input_bytes = sum(p.stat().st_size for p in plain.glob("*.tif"))
    reference = work / "reference.zarr"
    if reference.exists():
        shutil.rmtree(reference)

    def check(name: str) -> Callable[[Path], None]:
        """What checks the output of the first run of ``name`` (the default's is kept as the reference)."""

        def keep(output: Path) -> None:
            output.rename(reference)

        def compare(output: Path) -> None:
            check_apart(reference, output)
            print(f"{name}: output identical to the default run", file=sys.stderr)

        return keep if name == LAYOUTS[0][0] else compare

    rows = []
    for durable in (False, True):
        mode = ("durable, cold input" if can_drop else "durable, warm input") if durable else "page cache"
        samples: dict[str, list[tuple[Sample, int]]] = {name: [] for name, *_ in LAYOUTS}
        for repeat in range(repeats):
            print(f"layouts, {mode}: round {repeat + 1} of {repeats} ...", file=sys.stderr, flush=True)
            first = repeat == 0 and not durable
            for name, extra, _, every_round in LAYOUTS:
                if every_round or first:
                    command = [*SCRIPT, str(plain), str(out), *extra]
                    samples[name].append(measure_once(command, out, plain, durable, check(name) if first else None))
        default_wall = 0.0
        for name, _, target, _ in LAYOUTS:
            if not samples[name]:
                continue
            sample = median_sample([s for s, _ in samples[name]])
            size = statistics.median(b for _, b in samples[name])
            default_wall = default_wall or sample.wall
            ratio = sample.wall / default_wall
            verdict = "" if target is None else f"≤ {target:.2f} {'yes' if ratio <= target else '**no**'}"
            walls = ", ".join(f"{s.wall:.2f}" for s, _ in samples[name])
            rows.append(
                f"| {mode} | {name} | {sample.wall:.2f} ({walls}) | {ratio:.2f} | {verdict} | {sample.cpu:.2f} | "
                f"{sample.cpu / sample.wall:.2f} | {sample.peak_rss / 2**30:.2f} | {size / 2**30:.3f} | "
                f"{size / input_bytes:.3f} |"
            )
    shutil.rmtree(reference)
    return [
        LAYOUTS_HEADING + "\n",
        f"Machine: {machine()}\n",
        f"Input: the plain synthetic scroll above ({input_bytes / 2**30:.2f} GiB). Median of {repeats} runs "
        "(each run's wall time in brackets, in round order), taken round robin; gzip once, with the input in the "
        "page cache (it is slow). "
        "x default = wall / wall of the default run (zarr 2, uncompressed) of the same rounds and mode; target = "
        "issue 13's bound on that ratio; CPU = user + sys; CPU / wall = cores busy on average (2 on this machine's "
        "two cores); RSS = peak resident memory of the process tree; output = bytes on disk (allocated blocks) "
        "and their ratio to the input's bytes. Every layout's output was checked equal to the default run's.\n",
        "| mode | run | wall s (runs) | x default | target | CPU s | CPU / wall | peak RSS GiB | output GiB | "
        "output / input |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]


LAYOUTS_HEADING = "## Output layouts (issue 13)"


def write_section(output: Path, parts: list[str], heading: str | None) -> None:
    """Print ``parts`` and put them in ``output`` in place of the section under ``heading`` (or of the part
    before the first section, for ``None``), keeping the rest of the file."""
    text = "\n".join(parts) + "\n"
    print(text, end="")
    old = output.read_text() if output.exists() else ""
    sections = re.split(r"(?m)^(?=## )", old)
    head, rest = (sections[0], sections[1:]) if not sections[0].startswith("## ") else ("", sections)
    if heading is None:
        head = text
    else:
        found = [i for i, section in enumerate(rest) if section.startswith(heading + "\n")]
        if found:
            rest[found[0]] = text
        else:
            rest.insert(0, text)
    pieces = [head, *rest]
    output.write_text("\n".join(piece.rstrip("\n") + "\n" for piece in pieces if piece.strip()))


def check_apart(reference: Path, candidate: Path) -> None:
    """:func:`check_output_matches` in a process of its own.

    Reading whole levels in this process would raise its peak memory, which
    Linux hands down to every command started after it (exec keeps the
    parent's high-water RSS): every run measured 6.95 GiB peak once the checks
    had run in this process.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(check_output_matches, reference, candidate).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 2048, 2048), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=HERE / "data", help="where the synthetic stacks are kept")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--suite", choices=("settings", "layouts", "all"), default="all",
        help="settings: the runs against cp -r; layouts: issue 13's output layouts against the default run",
    )  # fmt: skip
    args = parser.parse_args()
    shape = tuple(args.shape)
    tag = "x".join(map(str, shape))
    plain, masked = args.data / f"plain_{tag}", args.data / f"masked_{tag}"
    ensure_stack(plain, shape, masked=False)
    work = args.data / "out"
    work.mkdir(exist_ok=True)
    can_drop = drop_page_cache()
    if args.suite != "layouts":
        ensure_stack(masked, shape, masked=True)
        settings_suite(args, shape, plain, masked, work, can_drop)
    if args.suite != "settings":
        write_section(args.output, layouts_suite(plain, work, args.repeats, can_drop), LAYOUTS_HEADING)
    return 0


def settings_suite(
    args: argparse.Namespace, shape: tuple[int, ...], plain: Path, masked: Path, work: Path, can_drop: bool
) -> None:
    """The runs against ``cp -r``; their report replaces the part of ``args.output`` before its first section."""
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
            "--max_gb 1/6 of default need",
            [*SCRIPT, str(plain), str(out), "--max_gb", str(need / 6 / 2**30)],
            out,
            plain,
        ),
        ("--workers 1", [*SCRIPT, str(plain), str(out), "--workers", "1"], out, plain),
        ("half the slices", [*SCRIPT, str(plain), str(out), f"--ranges={half}"], out, plain),
        ("cp -r (masked, zlib)", ["cp", "-r", str(masked), str(work / "copy")], work / "copy", masked),
        ("masked (zlib), default", [*SCRIPT, str(masked), str(out)], out, masked),
        ("masked (zlib), --workers 1", [*SCRIPT, str(masked), str(out), "--workers", "1"], out, masked),
    ]
    input_bytes = {source: sum(p.stat().st_size for p in source.glob("*.tif")) for source in (plain, masked)}
    rows = []
    for durable in (False, True):
        mode = ("durable, cold input" if can_drop else "durable, warm input") if durable else "page cache"
        # round robin, so that a slow spell of a noisy machine is shared by every run instead of hitting one
        samples: dict[str, list[Sample]] = {name: [] for name, *_ in runs}
        for repeat in range(args.repeats):
            print(f"{mode}: round {repeat + 1} of {args.repeats} ...", file=sys.stderr, flush=True)
            for name, command, output, source in runs:
                samples[name].append(measure_once(command, output, source, durable)[0])
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
    check_runs = [("--max_gb 1/6", ["--max_gb", str(need / 6 / 2**30)]), ("--workers 1", ["--workers", "1"])]
    subprocess.run([*SCRIPT, str(plain), str(out)], check=True)
    for name, extra in check_runs:
        other = work / "other.zarr"
        subprocess.run([*SCRIPT, str(plain), str(other), "--overwrite", *extra], check=True)
        check_apart(out, other)
        shutil.rmtree(other)
        print(f"{name}: output identical to the default run", file=sys.stderr)
    shutil.rmtree(out)
    write_section(
        args.output,
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
        None,
    )


if __name__ == "__main__":
    sys.exit(main())
