"""scroll_serve run as the user runs it, for the ``with`` block of a test: its address, links and messages."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from conftest import ROOT

STARTED = re.compile(r"^scroll_serve: (?:serving|proxying) .* at (http://[^ ]+)/ \(Ctrl-C to stop\)$")


@dataclass
class Served:
    """A running scroll_serve: its base address, the links it printed (by store), and its stderr lines so far."""

    process: subprocess.Popen[str]
    base: str = ""
    links: dict[str, str] = field(default_factory=dict)
    _stderr: queue.Queue[str] = field(default_factory=queue.Queue)
    stdout: queue.Queue[str] = field(default_factory=queue.Queue)
    lines: list[str] = field(default_factory=list)

    def messages(self, wait: float = 0.0) -> list[str]:
        """Every stderr line so far (after ``wait`` seconds, for lines of requests just answered)."""
        time.sleep(wait)
        while True:
            try:
                self.lines.append(self._stderr.get_nowait())
            except queue.Empty:
                return self.lines

    def stop(self) -> tuple[int, str]:
        """Ctrl-C; the exit code and the rest of stdout."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=30)
        self.messages(0.2)
        out = []
        while not self.stdout.empty():
            out.append(self.stdout.get_nowait())
        return code, "".join(out)


def raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (httpx would remove its dot segments first): status and body."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def state_of(link: str) -> dict[str, Any]:
    """The Neuroglancer state in a link's fragment."""
    fragment = link.split("#!", 1)[1]
    return json.loads(urllib.parse.unquote(fragment))


@contextmanager
def scroll_serve(*args: object, stores: int = 0, env: dict[str, str] | None = None, **popen: Any) -> Iterator[Served]:
    """Start ``scroll_serve.py args`` on a free port, wait until it listens and has printed ``stores`` links."""
    command = [sys.executable, str(ROOT / "scroll_serve.py"), *map(str, args), "--port", "0"]
    environment = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, **popen
    )
    served = Served(process)
    threading.Thread(target=_pump, args=(process.stderr, served._stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not served.base:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"scroll_serve did not start:\n{''.join(served.messages(0.5))}")
            for line in served.messages(0.05):
                match = STARTED.match(line.rstrip("\n"))
                if match:
                    served.base = match.group(1)
        assert process.stdout is not None
        printed: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, printed), daemon=True).start()
        for _ in range(stores):
            try:
                line = printed.get(timeout=60)
            except queue.Empty:
                raise AssertionError(f"scroll_serve printed {len(served.links)} links, not {stores}") from None
            name, link = line.rstrip("\n").split(": ", 1)
            served.links[name] = link
        served.stdout = printed
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _pump(stream: IO[str] | None, lines: queue.Queue[str]) -> None:
    assert stream is not None
    for line in stream:
        lines.put(line)
