"""What the benchmarks share: running a command while measuring it, the page cache, the machine, test data."""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from scrollzarr.synthetic import write_stack  # noqa: E402


@dataclass
class Sample:
    wall: float
    cpu: float
    peak_rss: int
    read: int


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue += [int(child) for child in children]
        except OSError:
            continue
    return found


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else 0


def _cpu(pid: int, children: bool = True) -> float:
    """User + system seconds of ``pid`` (and of its waited-for children), from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(v) for v in fields[11 : 15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def run_once(command: list[str], durable: bool, stderr: Path | None = None) -> Sample:
    """Run ``command`` (then ``sync`` if ``durable``); wall, CPU, peak tree RSS, bytes read.

    Its standard output is discarded; its standard error goes to ``stderr`` if given.
    """
    started = time.perf_counter()
    actions = [(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)]
    if stderr is not None:
        actions.append((os.POSIX_SPAWN_OPEN, 2, str(stderr), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    pid = os.posix_spawnp(command[0], command, os.environ, file_actions=actions)
    peak = 0
    done = threading.Event()
    descendants_cpu: dict[int, float] = {}

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            tree = _tree(pid)
            peak = max(peak, sum(_rss(p) for p in tree))
            for p in tree[1:]:
                descendants_cpu[p] = max(descendants_cpu.get(p, 0.0), _cpu(p, children=False))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    io = Path(f"/proc/{pid}/io").read_text()
    self_cpu = _cpu(pid, children=False)
    done.set()
    _, status, usage = os.wait4(pid, 0)
    if durable:
        os.sync()
    wall = time.perf_counter() - started
    watcher.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}")
    read = int(re.search(r"rchar: (\d+)", io).group(1))
    # Worker processes that the command does not wait for (a forkserver's) are not in its rusage:
    # their CPU time is sampled from /proc, missing at most their last 20 ms.
    cpu = max(usage.ru_utime + usage.ru_stime, self_cpu + sum(descendants_cpu.values()))
    # A child's ru_maxrss starts from the high-water mark of this process's memory at the spawn (Linux folds the
    # memory it execs from into it): after this process held a 1.7 GB .ppm it wrote, every run reported 4.45 GiB.
    # Then only the sampled peak of the tree can be told from this process's own.
    inherited = usage.ru_maxrss <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Sample(wall, cpu, peak if inherited else max(peak, usage.ru_maxrss * 1024), read)


def drop_page_cache() -> bool:
    """Drop clean page-cache pages; ``False`` where the machine does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm_file(path: Path) -> None:
    """Read ``path`` once, into the page cache."""
    with path.open("rb") as handle:
        while handle.read(1 << 24):
            pass


def warm(directory: Path) -> None:
    """Read every file of ``directory`` once, into the page cache."""
    for path in sorted(directory.iterdir()):
        warm_file(path)


def median_sample(samples: list[Sample]) -> Sample:
    """Median wall, CPU and bytes read of several runs, and the highest peak memory."""
    return Sample(
        statistics.median(s.wall for s in samples),
        statistics.median(s.cpu for s in samples),
        max(s.peak_rss for s in samples),
        int(statistics.median(s.read for s in samples)),
    )


def publish(parts: list[str], output: Path) -> None:
    """Print a benchmark's report (title, notes, markdown table lines) and write it to ``output``."""
    table = "\n".join(parts)
    print(table)
    output.write_text(table + "\n")


def ensure_stack(directory: Path, shape: tuple[int, int, int], masked: bool) -> None:
    marker = directory / ".complete"
    if marker.exists() and marker.read_text() == repr(shape):
        return
    if directory.exists():
        shutil.rmtree(directory)
    print(f"generating {directory} {shape} ...", file=sys.stderr, flush=True)
    write_stack(directory, shape, masked=masked, quiet=False)
    marker.write_text(repr(shape))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    filesystem = subprocess.run(["df", "-hT", str(HERE)], capture_output=True, text=True).stdout.splitlines()[-1]
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB memory; {platform.platform()}; "
        f"Python {platform.python_version()}, zarr {zarr.__version__}, tifffile {tifffile.__version__}, "
        f"numpy {np.__version__}; output file system: {' '.join(filesystem.split()[:2])}"
    )
