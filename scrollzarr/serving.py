"""scroll_serve's web server: a folder of stores, or a proxy of a remote one, for Neuroglancer.

An ASGI app (Starlette) under uvicorn, not a hand-written server: Starlette's
``StaticFiles`` answers byte ranges (``bytes=a-b``, suffix ``bytes=-n``, which
Neuroglancer asks for a shard's index at the end of a zarr 3 shard, and
several ranges at once), HEAD, ``If-Modified-Since``; it refuses paths leading
out of the served folder, also through a symlink (it compares real paths),
and any method but GET and HEAD.  Its CORS middleware adds what a viewer on
another origin needs: ``Access-Control-Allow-Origin: *`` on every answer, a
404 included (so that the browser reports a missing chunk as missing, not as
a network error, and Neuroglancer draws it as zeros), the ``Content-Range``,
``Content-Length`` and ``Content-Encoding`` headers exposed to the page's
scripts, and preflights that allow the ``Range`` header.  The preflight also
allows a public page (the Neuroglancer app on https://) to reach this server on
the loopback address (Chrome's Private Network Access).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import NotModifiedResponse, StaticFiles
from starlette.types import Receive, Scope, Send

from scrollzarr.errors import UsageError

log = logging.getLogger(__name__)

EXPOSED = ("Content-Range", "Content-Length", "Content-Encoding", "Accept-Ranges")
METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK = "127.0.0.1"


def with_cors(routes: Sequence[BaseRoute]) -> Starlette:
    """A Starlette app of ``routes`` with the CORS headers Neuroglancer needs (see the module's docstring)."""
    cors = Middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "HEAD"],
        allow_headers=["range"],
        expose_headers=EXPOSED,
        allow_private_network=True,
        max_age=3600,  # seconds a browser may reuse a preflight's answer
    )
    return Starlette(routes=list(routes), middleware=[cors, Middleware(_OnlyReading)])


class _OnlyReading:
    """Answers 405 to any method but GET, HEAD and OPTIONS (a preflight is answered by the CORS middleware before
    this; a plain OPTIONS gets the methods allowed)."""

    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] == "http" and scope["method"] not in METHODS:
            await _answer(send, 405, [(b"allow", ", ".join(METHODS).encode())])
            return
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            await _answer(send, 204, [(b"allow", ", ".join(METHODS).encode())])
            return
        await self.app(scope, receive, send)  # type: ignore[operator]


async def _answer(send: object, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", b"0")]})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]


def folder_app(root: Path) -> Starlette:
    """The app serving the files under ``root``, read-only (symlinks that stay inside ``root`` are followed)."""
    return with_cors([Mount("/", app=_Files(directory=root, follow_symlink=False, check_dir=True))])


# Bytes of a file (or of the range asked) read in one go: a chunk of a scroll volume (2 MiB of uint8 at 128³,
# 4 MiB of uint16), or the part of a shard Neuroglancer asks for, whatever the shard's size.
READ_AT_ONCE = 8 * 2**20
_SINGLE_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class _Files(StaticFiles):
    """Starlette's static files (paths, symlinks, methods, 304s), each file's answer a :class:`_ReadAtOnce`."""

    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = _ReadAtOnce(full_path, status_code=status_code, stat_result=stat_result)
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response


class _ReadAtOnce(FileResponse):
    """A file's answer as Starlette's, but a whole file or one range of at most :data:`READ_AT_ONCE` bytes is
    read in one go on a worker thread, and sent at once.

    Starlette reads a file in 64 KiB pieces, each one trip to a worker thread (open, read, close), and watches
    the connection meanwhile: measured with ``wrk -c32`` on 64 KiB files, 1,200 answers a second on this 2-core
    machine, against 2,000 for ``python -m http.server`` and 11,000 for bytes answered from memory.  Anything
    else (several ranges, ``If-Range``, a range that cannot be satisfied, a larger one) is Starlette's.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.stat_result is not None  # made by _Files with the stat of the lookup
        size = self.stat_result.st_size
        headers = Headers(scope=scope)
        span = None if "if-range" in headers else _span(headers.get("range"), size)
        if span is None or span[1] - span[0] > READ_AT_ONCE:
            await super().__call__(scope, receive, send)
            return
        start, stop = span
        body = b""
        if scope["method"] != "HEAD":
            body = await anyio.to_thread.run_sync(_read, self.path, start, stop - start)
            if len(body) != stop - start:  # the file changed since its stat: Starlette's answer, from a new one
                await FileResponse(self.path)(scope, receive, send)
                return
        answer = MutableHeaders(raw=list(self.raw_headers))
        status = self.status_code
        if "range" in headers:
            status = 206
            answer["content-range"] = f"bytes {start}-{stop - 1}/{size}"
            answer["content-length"] = str(stop - start)
        await send({"type": "http.response.start", "status": status, "headers": answer.raw})
        await send({"type": "http.response.body", "body": body})


def _span(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes ``[start, stop)`` a request asks for: all without ``Range``, its one range if it is one that can
    be satisfied; ``None`` for anything else (several ranges, malformed, past the end): Starlette's to answer."""
    if header is None:
        return 0, size
    match = _SINGLE_RANGE.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        stop = size if not last else min(size, int(last) + 1)
        return (start, stop) if start < stop else None
    if last and int(last) > 0:
        return max(0, size - int(last)), size
    return None


def _read(path: str | os.PathLike[str], start: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(start)
        return file.read(length)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: any free one).

    Raises
    ------
    UsageError
        For a port in use, an address this machine does not have, or a port it may not open.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UsageError(f"--bind {host}: not an address of this machine ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is in use (another scroll_serve?); give another with --port"
            ) from None
        if error.errno == errno.EACCES:
            raise UsageError(f"port {port} needs administrator rights; give one above 1023 with --port") from None
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror}; see --bind and --port") from None
    sock.listen(2048)
    return sock


def base_url(sock: socket.socket) -> str:
    """The http:// address of ``sock`` as a browser on this machine types it (a wildcard bind: the loopback)."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = LOOPBACK
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app: Starlette, sock: socket.socket, log_requests: bool) -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C or SIGTERM (uvicorn's own handling: requests under way finish), which
    end it normally (exit 0)."""
    _route_uvicorn_logs(log_requests)
    config = uvicorn.Config(
        app,
        log_config=None,  # the package's handler (scroll_serve: one line per message), not uvicorn's own
        access_log=log_requests,
        timeout_graceful_shutdown=5,  # seconds: Ctrl-C does not wait for a browser's idle connections
        server_header=False,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C or SIGTERM again once it has shut down: a server's end
        log.info("stopped")


def _route_uvicorn_logs(log_requests: bool) -> None:
    """uvicorn's messages through the package's handler: its errors always, each request's line with
    ``log_requests`` (method, path, status; never a header, so never a login)."""
    handlers = logging.getLogger("scrollzarr").handlers
    for name, level in (("uvicorn.error", logging.WARNING), ("uvicorn.access", logging.INFO)):
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers or [logging.StreamHandler(sys.stderr)]
        logger.propagate = False
        logger.setLevel(level if name == "uvicorn.error" or log_requests else logging.CRITICAL)
