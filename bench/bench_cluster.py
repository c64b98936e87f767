"""scroll_to_ome on a Dask cluster against the same conversion on this machine's threads (issue 14).

On the masked synthetic scroll (zlib-compressed TIFFs: decoding them makes
the conversion CPU-bound), in one run, round robin: the local threaded run
(the baseline), ``--scheduler local:1`` (a LocalCluster of one worker process)
and ``--scheduler local:2``.  Every store is checked byte for byte against the
baseline's.  Reported: median wall and CPU, the speed-up of local:2 over
local:1 (target ≥ 1.7) and the cost of the task machinery, local:2 against the
threaded run (target ≤ 1.25); and from each cluster run's log, its task count,
mean task time and the overhead: wall time minus the task time per worker
(starting the cluster, planning, the barriers between levels, the metadata).

With ``--ceiling``, also without Dask: one process of one worker thread
(``--workers 1``) against two such processes at once, each converting half
the rows (``--ranges``) into a store of its own.  Their ratio is what this
machine gives for a second process doing the same work, the most local:2
could gain over local:1 were the cluster free.

Usage: python bench/bench_cluster.py [--shape Z Y X] [--repeats N] [--ceiling]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import shutil
import statistics
import sys
from pathlib import Path

from measure import HERE, ROOT, drop_page_cache, ensure_stack, machine, publish, run_once, warm

SCRIPT = [sys.executable, str(ROOT / "scroll_to_ome.py")]
RUNS = {
    "this machine's threads (baseline)": [],
    "--scheduler local:1": ["--scheduler", "local:1"],
    "--scheduler local:2": ["--scheduler", "local:2"],
}
# Without Dask, with --ceiling: the same work in one process, and in two at once (half the rows each).
ALONE = "one process, --workers 1 (no Dask)"
PAIR = "two processes at once, --workers 1, half the rows each (no Dask)"
TASKS = re.compile(r"level (\d+): (\d+) task\(s\) run, ([\d.]+) s each on average")


def digest(store: Path) -> str:
    """One hash of every file of ``store`` (path and bytes)."""
    total = hashlib.sha256()
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        total.update(str(path.relative_to(store)).encode() + b"\0" + path.read_bytes())
    return total.hexdigest()


def task_figures(log: str) -> tuple[int, float]:
    """Tasks run and their total seconds, from a cluster run's ``-v`` log."""
    found = [(int(count), int(count) * float(mean)) for _, count, mean in TASKS.findall(log)]
    return sum(count for count, _ in found), sum(seconds for _, seconds in found)


def alone_or_pair(pair: bool, masked: Path, shape: tuple[int, ...], stores: list[Path]) -> list[str]:
    """The command that converts ``masked`` with one worker thread and no Dask: in one process into
    ``stores[0]``, or (``pair``) in two at once, each half of the rows (``--ranges``) into a store of its own."""
    one = [*SCRIPT, str(masked), str(stores[0]), "--quiet", "--workers", "1"]
    if not pair:
        return one
    half = shape[1] // 2
    first = shlex.join([*one, "--ranges", f":,0:{half},:"])
    second = shlex.join([*SCRIPT, str(masked), str(stores[1]), "--quiet", "--workers", "1", "--ranges", f":,{half}:,:"])
    return ["sh", "-c", f"{first} & pid=$!; {second}; b=$?; wait $pid; a=$?; [ $a = 0 ] && [ $b = 0 ]"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 2048, 2048), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=HERE / "data", help="where the synthetic stacks are kept")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS_cluster.md")
    parser.add_argument("--ceiling", action="store_true", help="also the same work without Dask: 1 process and 2")
    args = parser.parse_args()
    shape = tuple(args.shape)
    masked = args.data / f"masked_{'x'.join(map(str, shape))}"
    ensure_stack(masked, shape, masked=True)
    work = args.data / "cluster"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out, log = work / "scroll.zarr", work / "log.txt"
    drop_page_cache()
    warm(masked)
    runs = [*RUNS, *([ALONE, PAIR] if args.ceiling else [])]
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    tasks: dict[str, list[tuple[int, float]]] = {name: [] for name in runs}
    expected = None
    for repeat in range(args.repeats):
        names = runs if repeat % 2 == 0 else runs[::-1]
        for name in names:
            shutil.rmtree(out, ignore_errors=True)
            if name not in RUNS:
                stores = [work / f"part{number}.zarr" for number in range(2)]
                sample = run_once(alone_or_pair(name == PAIR, masked, shape, stores), durable=False, stderr=log)
                for store in stores:
                    shutil.rmtree(store, ignore_errors=True)
                walls[name].append(sample.wall)
                cpus[name].append(sample.cpu)
                print(f"round {repeat + 1}: {name}: {sample.wall:.2f} s", file=sys.stderr, flush=True)
                continue
            sample = run_once([*SCRIPT, str(masked), str(out), "--verbose", *RUNS[name]], durable=False, stderr=log)
            walls[name].append(sample.wall)
            cpus[name].append(sample.cpu)
            tasks[name].append(task_figures(log.read_text()))
            found = digest(out)
            expected = expected or found
            if found != expected:
                raise SystemExit(f"{name}: the store differs from the first run's")
            print(f"round {repeat + 1}: {name}: {sample.wall:.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(work)
    wall = {name: statistics.median(values) for name, values in walls.items()}
    base, one, two = (wall[name] for name in RUNS)
    input_bytes = sum(p.stat().st_size for p in masked.glob("*.tif"))
    lines = [
        "# scroll_to_ome on a Dask cluster (issue 14)",
        "",
        f"Machine: {machine()}",
        "",
        f"Input: the masked synthetic scroll, {shape[0]} x {shape[1]} x {shape[2]} uint16 (zlib TIFFs, "
        f"{input_bytes / 2**30:.2f} GiB), in the page cache; default options (6 levels, 128^3 chunks). Median of "
        f"{args.repeats} runs, round robin (each run's wall time in brackets); CPU = user + sys of the process "
        "tree. Every store was checked equal, byte for byte, to the first run's. Tasks: tasks run, over all "
        "levels, and their mean time; overhead = wall - task seconds / workers (starting the cluster, planning, "
        "the barrier between levels, the metadata).",
        "",
        "| run | wall s (runs) | x baseline | CPU s | tasks | mean task s | overhead s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, workers in zip(RUNS, (0, 1, 2), strict=True):
        runs = ", ".join(f"{value:.2f}" for value in walls[name])
        count = tasks[name][0][0]
        figures = "| | |"
        if workers:
            mean = statistics.median(total / max(n, 1) for n, total in tasks[name])
            pairs = zip(walls[name], tasks[name], strict=True)
            overhead = statistics.median(w - total / workers for w, (_, total) in pairs)
            figures = f"{count} | {mean:.2f} | {overhead:.2f} |"
        lines.append(
            f"| {name} | {wall[name]:.2f} ({runs}) | {wall[name] / base:.2f} | "
            f"{statistics.median(cpus[name]):.2f} | {figures}"
        )
    lines += [
        "",
        f"local:2 against local:1: {one / two:.2f} x faster (target at least 1.7); local:2 against this machine's "
        f"threads: {two / base:.2f} x the time (target at most 1.25).",
    ]
    if args.ceiling:
        lines += ["", "Without Dask, the same work:", "", "| run | wall s (runs) | CPU s |", "| --- | ---: | ---: |"]
        for name in (ALONE, PAIR):
            runs_text = ", ".join(f"{value:.2f}" for value in walls[name])
            lines.append(f"| {name} | {wall[name]:.2f} ({runs_text}) | {statistics.median(cpus[name]):.2f} |")
        lines += [
            "",
            f"Two processes against one: {wall[ALONE] / wall[PAIR]:.2f} x faster: what this machine gives for a "
            "second process doing the same work, the most local:2 could gain over local:1 were the cluster free.",
        ]
    command = f"python bench/bench_cluster.py --shape {' '.join(map(str, shape))} --repeats {args.repeats}"
    lines += ["", f"Command: `{command}{' --ceiling' if args.ceiling else ''}`"]
    publish(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
