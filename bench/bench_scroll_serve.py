"""Benchmark scroll_serve: chunks a second served to a viewer's many parallel requests, against
``python -m http.server`` in the same run.

A folder of chunk files (uint8 128³ chunks, 2 MiB, as the published volumes'; and 64 KiB objects, a
small chunk or a shard's index) is fetched by CONCURRENCY requests at once (Neuroglancer keeps dozens
in flight), whole, by one httpx client in this process, from:

- ``python -m http.server`` (the baseline: Python's threading server, what users reach for);
- ``scroll_serve PATH``;
- a slow upstream (the same threading server with LATENCY added to every answer, as a distant data
  server) reached directly, and through ``scroll_serve --proxy``: first cold (every object fetched
  upstream), then warm (every object from the proxy's disk cache).

Every answer's bytes are checked against the file. Reports the median of REPEATS passes, chunks/s and
MB/s, and each server's ratio to its baseline.

Usage: python bench/bench_scroll_serve.py [--repeats N] [--latency S]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np

from measure import HERE, ROOT, machine, publish

CONCURRENCY = 32
SETS = {"2 MiB chunks": (2 * 2**20, 200), "64 KiB objects": (64 * 2**10, 2000)}


def make_files(root: Path) -> dict[str, list[tuple[str, bytes]]]:
    """The benchmark's files under ``root``: name -> [(path below root, bytes)]."""
    rng = np.random.default_rng(0)
    files: dict[str, list[tuple[str, bytes]]] = {}
    for label, (size, count) in SETS.items():
        folder = f"{size}"
        (root / folder).mkdir(parents=True)
        files[label] = []
        for index in range(count):
            data = rng.integers(0, 256, size, dtype="uint8").tobytes()
            path = f"{folder}/{index // 100}/{index % 100}"
            (root / path).parent.mkdir(exist_ok=True)
            (root / path).write_bytes(data)
            files[label].append((path, data))
    return files


class _Slow(SimpleHTTPRequestHandler):
    latency = 0.0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        time.sleep(self.latency)
        return super().send_head()


@contextmanager
def threading_server(root: Path, latency: float) -> Iterator[str]:
    """Python's threading HTTP server of ``root`` in this process, each answer ``latency`` seconds late."""
    handler = functools.partial(type("Slow", (_Slow,), {"latency": latency}), directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def process_server(command: list[str], port: int) -> Iterator[str]:
    """A server run as its own process (as users run it) on ``port``, once it answers."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"benchmark: {command} did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


async def fetch_all(base: str, files: list[tuple[str, bytes]]) -> float:
    """Seconds to GET every file, CONCURRENCY at a time; each answer checked."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(path: str, data: bytes) -> None:
            async with slots:
                response = await client.get(f"{base}/{path}")
            if response.status_code != 200 or response.content != data:
                raise SystemExit(f"benchmark: {base}/{path} answered {response.status_code}, not its bytes")

        started = time.perf_counter()
        await asyncio.gather(*(one(path, data) for path, data in files))
        return time.perf_counter() - started


def passes(base: str, files: list[tuple[str, bytes]], repeats: int) -> float:
    return statistics.median(asyncio.run(fetch_all(base, files)) for _ in range(repeats))


def row(label: str, count: int, size: int, what: str, seconds: float, versus: float, against: str) -> str:
    """A table row: ``count`` objects of ``size`` bytes in ``seconds``; the ratio of ``versus`` to it."""
    rate = f"{count / seconds:,.0f} | {count * size / seconds / 1e6:,.0f}"
    return f"| {label} | {what} | {rate} | {versus / seconds:.2f} x {against} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the slow upstream adds to each answer")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        files = make_files(work / "files")
        serve = [sys.executable, str(ROOT / "scroll_serve.py"), "--quiet"]
        rows = []
        for label, chosen in files.items():
            size = SETS[label][0]
            port = free_port()
            baseline_command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
            with process_server([*baseline_command, "--directory", str(work / "files")], port) as base:
                baseline = passes(base, chosen, args.repeats)
            port = free_port()
            with process_server([*serve, str(work / "files"), "--port", str(port)], port) as base:
                ours = passes(base, chosen, args.repeats)
            with threading_server(work / "files", args.latency) as upstream:
                direct = passes(upstream, chosen, args.repeats)
                cold_times, warm_times = [], []
                for _ in range(args.repeats):
                    cache = work / "cache"
                    shutil.rmtree(cache, ignore_errors=True)
                    port = free_port()
                    proxy = [*serve, "--proxy", upstream + "/", "--port", str(port), "--cache_dir", str(cache)]
                    with process_server(proxy, port) as base:
                        cold_times.append(asyncio.run(fetch_all(base, chosen)))
                        warm_times.append(asyncio.run(fetch_all(base, chosen)))
                cold, warm = statistics.median(cold_times), statistics.median(warm_times)

            count = len(chosen)
            rows += [
                row(label, count, size, "`python -m http.server` (baseline)", baseline, baseline, "itself"),
                row(label, count, size, "`scroll_serve PATH`", ours, baseline, "http.server"),
                row(
                    label, count, size, f"slow upstream direct ({args.latency * 1000:.0f} ms)", direct, direct, "itself"
                ),
                row(label, count, size, "`scroll_serve --proxy`, cold cache", cold, direct, "upstream direct"),
                row(label, count, size, "`scroll_serve --proxy`, warm cache", warm, direct, "upstream direct"),
            ]
        publish(
            [
                "# scroll_serve benchmark",
                "",
                f"Machine: {machine()}",
                "",
                f"Command: `python bench/bench_scroll_serve.py --repeats {args.repeats} --latency {args.latency}`. "
                f"{CONCURRENCY} requests at once from one httpx client in the benchmark's process (on the same "
                f"cores as the servers); median of {args.repeats} passes over every file; every answer checked.",
                "",
                "| objects | server | objects/s | MB/s | ratio |",
                "| --- | --- | ---: | ---: | ---: |",
                *rows,
            ],
            HERE / "RESULTS_scroll_serve.md",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.chdir(HERE)
    sys.exit(main())
