"""Two checkouts of scroll_to_ome, round robin, on the same input: wall and CPU of each layout, before and after.

For a change measured on a noisy machine: each round runs every layout with
both checkouts (their order alternating between rounds), in the page cache and
"durable" (input dropped from the page cache, the run followed by ``sync``), as
bench_scroll_to_ome.py does.  Prints a markdown table of medians, with each
run's wall time.

Usage: python bench/ab_scroll_to_ome.py BEFORE_DIR AFTER_DIR [--rounds N] [--shape Z Y X]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

from measure import HERE, Sample, drop_page_cache, ensure_stack, run_once, warm

LAYOUTS = {
    "blosc-lz4 (zarr 2)": ["--compressor", "blosc-lz4"],
    "blosc-zstd 3 (zarr 2)": ["--compressor", "blosc-zstd", "--clevel", "3"],
    "--preset v3-sharded (blosc-zstd 3)": ["--preset", "v3-sharded"],
    "zarr 3, shards 128,1024,1024": ["--zarr_format", "3", "--shard_shape", "128,1024,1024"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="checkout (a git worktree) with the code before the change")
    parser.add_argument("after", type=Path, help="checkout with the code after it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 2048, 2048), metavar=("Z", "Y", "X"))
    args = parser.parse_args()
    plain = HERE / "data" / f"plain_{'x'.join(map(str, args.shape))}"
    ensure_stack(plain, tuple(args.shape), masked=False)
    out = HERE / "data" / "out" / "ab.zarr"
    out.parent.mkdir(exist_ok=True)
    versions = [("before", args.before), ("after", args.after)]
    samples: dict[tuple[bool, str, str], list[Sample]] = {}
    for durable in (False, True):
        for round_ in range(args.rounds):
            for name, extra in LAYOUTS.items():
                for version, checkout in versions if round_ % 2 == 0 else versions[::-1]:
                    shutil.rmtree(out, ignore_errors=True)
                    os.sync()
                    drop_page_cache() if durable else warm(plain)
                    command = [sys.executable, str(checkout / "scroll_to_ome.py"), "--quiet", str(plain), str(out)]
                    samples.setdefault((durable, name, version), []).append(run_once([*command, *extra], durable))
    shutil.rmtree(out, ignore_errors=True)
    print("| mode | run | before: wall s (runs) | after: wall s (runs) | before: CPU s | after: CPU s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for durable in (False, True):
        for name in LAYOUTS:
            cells = []
            for version, _ in versions:
                runs = samples[(durable, name, version)]
                walls = ", ".join(f"{s.wall:.2f}" for s in runs)
                cells.append(
                    (f"{statistics.median(s.wall for s in runs):.2f} ({walls})", statistics.median(s.cpu for s in runs))
                )
            mode = "durable" if durable else "page cache"
            print(f"| {mode} | {name} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]:.2f} | {cells[1][1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
