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

import asyncio
import errno
import logging
import os
import re
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from scrollzarr.errors import UsageError

log = logging.getLogger(__name__)

EXPOSED = ("Content-Range", "Content-Length", "Content-Encoding", "Accept-Ranges")
METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK = "127.0.0.1"
LOOPBACKS = ("127.0.0.1", "localhost", "::1")


def with_cors(
    routes: Sequence[BaseRoute], origins: Sequence[str] = ("*",), hosts: Sequence[str] | None = None
) -> Starlette:
    """A Starlette app of ``routes`` with the CORS headers Neuroglancer needs (see the module's docstring), for
    pages of ``origins`` (``*``: any), answering requests for the ``Host`` names ``hosts`` only (``None``: any).

    The host check keeps out DNS rebinding: a page of another site whose name the attacker points at 127.0.0.1
    is of the same origin as this server to the browser, which then lets it read every answer; its requests
    carry that name in ``Host``.
    """
    cors = Middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_methods=["GET", "HEAD"],
        allow_headers=["range"],
        expose_headers=EXPOSED,
        allow_private_network=True,
        max_age=3600,  # seconds a browser may reuse a preflight's answer
    )
    return Starlette(routes=list(routes), middleware=[Middleware(_Guard, hosts=hosts), cors])


def loopback_hosts(bind: str) -> list[str] | None:
    """The ``Host`` names a server bound to ``bind`` answers: this machine's names on the loopback, any
    elsewhere (a server meant for other machines is reached by names this one cannot know)."""
    return ["127.0.0.1", "localhost", "::1"] if bind in LOOPBACKS else None


class _Guard:
    """Answers 400 to a request for a ``Host`` not among ``hosts``, 405 to any method but GET, HEAD and OPTIONS
    (a preflight is answered by the CORS middleware after this; a plain OPTIONS gets the methods allowed); drops
    a ``Range`` in units other than bytes."""

    def __init__(self, app: object, hosts: Sequence[str] | None) -> None:
        self.app = app
        self.hosts = None if hosts is None else {host.lower() for host in hosts}

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            if self.hosts is not None and _host_name(headers.get("host", "")) not in self.hosts:
                await _answer(send, 400, [], b"Invalid host header")
                return
            if scope["method"] not in METHODS:
                await _answer(send, 405, [(b"allow", ", ".join(METHODS).encode())])
                return
            if scope["method"] == "OPTIONS" and "access-control-request-method" not in headers:
                await _answer(send, 204, [(b"allow", ", ".join(METHODS).encode())])
                return
            range_header = headers.get("range")
            if range_header is not None and not _in_bytes(range_header):  # other units: ignored (RFC 9110, 14.2)
                scope = dict(scope, headers=[(name, value) for name, value in scope["headers"] if name != b"range"])
        await self.app(scope, receive, send)  # type: ignore[operator]


def _host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:9000`` is ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _answer(send: object, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": body})  # type: ignore[operator]


def folder_app(root: Path, hosts: Sequence[str] | None = None) -> Starlette:
    """The app serving the files under ``root``, read-only (symlinks that stay inside ``root`` are followed), to
    pages of any origin, for the ``Host`` names ``hosts`` (``None``: any)."""
    return with_cors([Mount("/", app=_Files(directory=root, follow_symlink=False, check_dir=True))], ("*",), hosts)


# Bytes of a file (or of the range asked) read in one go: a chunk of a scroll volume (2 MiB of uint8 at 128³,
# 4 MiB of uint16), or the part of a shard Neuroglancer asks for, whatever the shard's size.
READ_AT_ONCE = 8 * 2**20
_SINGLE_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class _Files(StaticFiles):
    """Starlette's static files, a plain GET or HEAD of a file (or of one range of it) of at most
    :data:`READ_AT_ONCE` bytes answered in one trip to a worker thread: the path looked up as Starlette does
    (:meth:`StaticFiles.lookup_path`: real paths inside the folder), the bytes read, sent at once.

    Starlette makes a trip for the lookup, then one for each of open, each 64 KiB read and close, and watches
    the connection meanwhile: measured with ``wrk -c32`` on 64 KiB files, 1,200 answers a second on this 2-core
    machine, against 2,000 for ``python -m http.server`` and 11,000 for bytes answered from memory.  Anything
    else (conditional requests, several ranges, a range that cannot be satisfied, larger answers, folders) is
    Starlette's own answer.
    """

    async def get_response(self, path: str, scope: Scope) -> Response:
        headers = Headers(scope=scope)
        if scope["method"] in ("GET", "HEAD"):
            conditional = any(name in headers for name in _CONDITIONAL)
            answer = await anyio.to_thread.run_sync(
                self._answer, path, headers.get("range"), scope["method"], conditional
            )
            if answer is not None:
                return answer
        return await super().get_response(path, scope)

    def _answer(self, path: str, range_header: str | None, method: str, conditional: bool) -> Response | None:
        """On a worker thread: the answer, or ``None`` where it is Starlette's (a ``conditional`` request's)."""
        try:
            full_path, stat_result = self.lookup_path(path)
        except PermissionError:
            return PlainTextResponse("Forbidden", status_code=403)
        except (OSError, ValueError):  # names too long, null bytes: Starlette's answers
            return None
        if stat_result is None:  # as Starlette answers it: a missing chunk, asked often
            return PlainTextResponse("Not Found", status_code=404)
        if not stat.S_ISREG(stat_result.st_mode):
            return None
        if not os.access(full_path, os.R_OK):  # before Starlette's answers too: it would open it, and fail with 500
            return PlainTextResponse("Forbidden", status_code=403)
        if conditional:
            return None
        span = _span(range_header, stat_result.st_size)
        if span is None or span[1] - span[0] > READ_AT_ONCE:
            return None
        start, stop = span
        try:
            with open(full_path, "rb") as file:
                if os.fstat(file.fileno()).st_size != stat_result.st_size:
                    return None  # changed since the lookup: Starlette's answer, from a new lookup
                body = b"" if method == "HEAD" else os.pread(file.fileno(), stop - start, start)
        except PermissionError:
            return PlainTextResponse("Forbidden", status_code=403)
        if len(body) != stop - start and method != "HEAD":  # cut short while read: the browser asks again
            changed = "the file changed while it was read"
            return PlainTextResponse(changed, status_code=503, headers={"retry-after": "0"})
        headers = MutableHeaders(raw=list(FileResponse(full_path, stat_result=stat_result).raw_headers))
        status = 200
        if _in_bytes(range_header):
            status = 206
            headers["content-range"] = f"bytes {start}-{stop - 1}/{stat_result.st_size}"
            headers["content-length"] = str(stop - start)
        return Response(body, status_code=status, headers=dict(headers))


_CONDITIONAL = ("if-range", "if-none-match", "if-modified-since")


def _in_bytes(header: str | None) -> bool:
    return header is not None and header.strip().lower().startswith("bytes")


def _span(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes ``[start, stop)`` a request asks for: all without ``Range``, its one range if it is one that can
    be satisfied; ``None`` for anything else (several ranges, malformed, past the end): Starlette's to answer."""
    if header is None or not _in_bytes(header):
        return 0, size  # no range, or one in units other than bytes: ignored (RFC 9110, 14.2)
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
    logging.getLogger("uvicorn.error").filters[:] = [_not_cancelled]


def _not_cancelled(record: logging.LogRecord) -> bool:
    """Leaves out uvicorn's traceback of a request cancelled at shutdown (Ctrl-C with a download under way, or a
    proxied request waiting on the upstream): the server is stopping as asked, the browser asks again."""
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))
