"""A web server like the scroll data server, started by a test: a directory's files over HTTP, with byte ranges,
latency, a 429 now and then, an optional basic-auth login, and a record of every request it answered."""

from __future__ import annotations

import base64
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    authorization: str | None
    method: str = "GET"


@dataclass
class DataServer:
    """The server's settings (changeable while it runs) and what it answered."""

    root: Path
    latency: float = 0.0  # seconds before each answer
    busy_every: int = 0  # every n-th request is answered 429 (0: never)
    login: tuple[str, str] | None = None
    honour_ranges: bool = True
    fail_after: int | None = None  # requests answered before every later one is answered 503 (a server going down)
    retry_after: str = "0"  # the Retry-After of the 429 and 503 answers
    refuse: int | None = None  # a status to answer requests with (403: a forbidden folder)
    refused: tuple[str, ...] = ("",)  # the ends of the paths refused (all by default)
    html_for_missing: bool = False  # a missing file answered 200 with an HTML page, as some servers do
    redirects: dict[str, str] = field(default_factory=dict)  # path -> the Location of a 302 answering it
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answered(self, status: int = 200) -> list[Request]:
        """Requests answered with data (200 or 206) or, with ``status``, with that status."""
        ok = {200, 206} if status == 200 else {status}
        return [request for request in self.requests if request.status in ok]


class _Handler(BaseHTTPRequestHandler):
    server_state: DataServer

    def log_message(self, format: str, *args: object) -> None:  # the test's output stays quiet
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        state = self.server_state
        time.sleep(state.latency)
        header = self.headers.get("Range")
        auth = self.headers.get("Authorization")
        with state._lock:
            state._count += 1
            busy = state.busy_every and state._count % state.busy_every == 0
        if state.login is not None:
            expected = "Basic " + base64.b64encode(":".join(state.login).encode()).decode()
            if auth != expected:
                return self._answer(401, b"", header, auth, {"WWW-Authenticate": 'Basic realm="scrolls"'})
        if self.path in state.redirects:
            return self._answer(302, b"", header, auth, {"Location": state.redirects[self.path]})
        if state.refuse is not None and self.path.endswith(state.refused):
            return self._answer(state.refuse, b"no", header, auth)
        if state.fail_after is not None and state._count > state.fail_after:
            return self._answer(503, b"down", header, auth, {"Retry-After": state.retry_after})
        if busy:
            return self._answer(429, b"slow down", header, auth, {"Retry-After": state.retry_after})
        path = (state.root / urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")).resolve()
        if state.root.resolve() not in path.parents or not path.is_file():
            if state.html_for_missing:
                page = b"<html><body>Not here</body></html>"
                return self._answer(200, page, header, auth, {"Content-Type": "text/html; charset=utf-8"})
            return self._answer(404, b"", header, auth)
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
        if match is None or not state.honour_ranges:
            return self._answer(200, data, header, auth)
        first, last = match.groups()
        if first == "":
            start, stop = max(0, len(data) - int(last)), len(data)
        else:
            start, stop = int(first), len(data) if last == "" else min(len(data), int(last) + 1)
        if start >= len(data):
            return self._answer(416, b"", header, auth, {"Content-Range": f"bytes */{len(data)}"})
        extra = {"Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"}
        return self._answer(206, data[start:stop], header, auth, extra)

    def _answer(
        self, status: int, body: bytes, range_: str | None, auth: str | None, headers: dict[str, str] | None = None
    ) -> None:
        state = self.server_state
        with state._lock:
            state.requests.append(Request(self.path, range_, status, auth, self.command))
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@contextmanager
def data_server(root: Path, **settings: object) -> Iterator[DataServer]:
    """A :class:`DataServer` of ``root`` on a free port of 127.0.0.1, for the ``with`` block."""
    state = DataServer(root, **settings)  # type: ignore[arg-type]
    handler = type("Handler", (_Handler,), {"server_state": state, "protocol_version": "HTTP/1.1"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
