"""Benchmark scroll_serve: chunks a second served to a viewer's many parallel requests, against
``python -m http.server`` in the same run.

A folder of chunk files (uint8 128³ chunks, 2 MiB, as the published volumes'; and 64 KiB objects, a
small chunk or a shard's index) is asked for by CONCURRENCY connections at once (Neuroglancer keeps
dozens in flight), every file in turn, by ``wrk`` (Debian's package: a load generator in C, so that
the client is not what is measured) for SECONDS, from:

- ``python -m http.server`` (the baseline: Python's threading server, what users reach for);
- ``scroll_serve PATH``;
- a slow upstream (Python's threading server with LATENCY added to every answer, as a distant data
  server) reached directly, and through ``scroll_serve --proxy`` with its cache filled.

The proxy's first pass (every object fetched upstream once, the cache empty) is timed by an httpx
client here, as is the same pass straight to the upstream. Every server's answers are checked
against the files once, by that client. Reports the median of REPEATS, objects/s and MB/s, and the
ratio of each to its baseline.

Usage: python bench/bench_scroll_serve.py [--repeats N] [--latency S] [--seconds S]
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


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # wrk drops its connections at the end of each run: broken pipes, not the benchmark's concern


@contextmanager
def threading_server(root: Path, latency: float) -> Iterator[str]:
    """Python's threading HTTP server of ``root`` in this process, each answer ``latency`` seconds late."""
    handler = functools.partial(type("Slow", (_Slow,), {"latency": latency}), directory=str(root))
    server = _QuietServer(("127.0.0.1", 0), handler)
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


def wrk(base: str, files: list[tuple[str, bytes]], seconds: float, repeats: int) -> float:
    """Answers a second, the median of ``repeats`` runs of ``wrk`` asking for every file in turn."""
    paths = ", ".join(f'"/{path}"' for path, _ in files)
    script = (
        f"paths = {{{paths}}}\ni = 0\n"
        "request = function()\n  i = i + 1\n  return wrk.format('GET', paths[(i % #paths) + 1])\nend\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        rates = []
        for _ in range(repeats):
            command = ["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{seconds:g}s", "-s", lua.name, base]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            if "Non-2xx" in output:
                raise SystemExit(f"benchmark: wrk against {base} had answers other than 200:\n{output}")
            for line in output.splitlines():  # python -m http.server's short listen queue drops connections
                if "Socket errors" in line:
                    print(f"{base}: {line.strip()}", file=sys.stderr)
            rates.append(float(output.split("Requests/sec:")[1].split()[0]))
    return statistics.median(rates)


def row(label: str, size: int, what: str, rate: float, baseline: float, against: str) -> str:
    """A table row: ``rate`` objects of ``size`` bytes a second, and its ratio to ``baseline``."""
    return f"| {label} | {what} | {rate:,.0f} | {rate * size / 1e6:,.0f} | {rate / baseline:.2f} x {against} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the slow upstream adds to each answer")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of each wrk run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("benchmark: needs wrk, the load generator (Debian: apt-get install wrk)")
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
                asyncio.run(fetch_all(base, chosen))  # checked
                baseline = wrk(base, chosen, args.seconds, args.repeats)
            port = free_port()
            with process_server([*serve, str(work / "files"), "--port", str(port)], port) as base:
                asyncio.run(fetch_all(base, chosen))
                ours = wrk(base, chosen, args.seconds, args.repeats)
            with threading_server(work / "files", args.latency) as upstream:
                direct_pass = passes(upstream, chosen, args.repeats)
                direct = wrk(upstream, chosen, args.seconds, args.repeats)
                cold_times, warm = [], 0.0
                for _ in range(args.repeats):
                    cache = work / "cache"
                    shutil.rmtree(cache, ignore_errors=True)
                    port = free_port()
                    proxy = [*serve, "--proxy", upstream + "/", "--port", str(port), "--cache_dir", str(cache)]
                    with process_server(proxy, port) as base:
                        cold_times.append(asyncio.run(fetch_all(base, chosen)))
                        asyncio.run(fetch_all(base, chosen))  # checked, from the cache
                        warm = wrk(base, chosen, args.seconds, args.repeats)
                cold = statistics.median(cold_times)
            count = len(chosen)
            latency = f"{args.latency * 1000:.0f} ms"
            rows += [
                row(label, size, "`python -m http.server` (baseline)", baseline, baseline, "itself"),
                row(label, size, "`scroll_serve PATH`", ours, baseline, "http.server"),
                row(label, size, f"slow upstream direct ({latency})", direct, direct, "itself"),
                row(label, size, "`scroll_serve --proxy`, cache filled", warm, direct, "upstream direct"),
                row(label, size, f"slow upstream direct ({latency}), first pass", count / direct_pass,
                    count / direct_pass, "itself"),
                row(label, size, "`scroll_serve --proxy`, first pass (cache empty)", count / cold,
                    count / direct_pass, "upstream direct, first pass"),
            ]  # fmt: skip
        publish(
            [
                "# scroll_serve benchmark",
                "",
                f"Machine: {machine()}",
                "",
                f"Command: `python bench/bench_scroll_serve.py --repeats {args.repeats} --latency {args.latency} "
                f"--seconds {args.seconds}`. wrk (2 threads, {CONCURRENCY} connections, {args.seconds:g} s, every "
                "file in turn) on the same 2 cores as the servers; the first passes by an httpx client "
                f"({CONCURRENCY} requests at once); medians of {args.repeats}; every server's answers checked.",
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
