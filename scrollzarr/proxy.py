"""scroll_serve --proxy: a remote server's files on 127.0.0.1, logged in, retried, cached on disk, with CORS.

Neuroglancer cannot send a login (it refuses ``user:pass@`` URLs), and the
public data server answers bursts with 429.  The proxy asks the upstream for
``upstream + path`` only (a path with a ``.`` or ``..`` segment, or one that
would leave the prefix once encoded, is refused with 403), with the login of
:func:`proxy_login`, at most :data:`CONNECTIONS` requests at once, retried on
429, 5xx and network failures as :mod:`scrollzarr.fetching` does (honouring
``Retry-After``).  It forwards the ``Range`` header and passes the upstream's
status (200, 206, 404, 416, 401 …), ``Content-Range``, ``Content-Length``,
``Content-Type``, ``ETag`` and ``Last-Modified`` through; it asks for the
objects uncompressed (``Accept-Encoding: identity``), so that the bytes and
ranges it passes on are the object's own.

Answers of 200, 206 and 404 to GET and HEAD are kept in the disk cache, by
method, URL and range (a shard's index and each chunk range Neuroglancer reads
are cached as it reads them, without fetching whole shards): a second viewing
asks the upstream nothing, also after a restart.  A 404 is kept too, as the
missing (all-zero) chunks of a scroll volume are many and stay missing: a
published volume does not change (a user viewing a store that is still being
written clears ``--cache_dir``, or gives ``--cache_gb 0``).  Answers larger
than :data:`MAX_CACHED` are streamed through, not kept.  The same request made
twice at once is sent upstream once.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from scrollzarr import fetching
from scrollzarr.diskcache import DiskCache
from scrollzarr.errors import UsageError
from scrollzarr.serving import with_cors

log = logging.getLogger(__name__)

CONNECTIONS = 16  # upstream requests at once; the data server answers more with 429
MAX_CACHED = 64 * 2**20  # bytes: larger answers (a whole shard) are streamed through, not kept
CACHED_STATUSES = frozenset({200, 206, 404})
PASSED_HEADERS = ("content-type", "content-range", "content-length", "etag", "last-modified")
SAFE = "~!$&'()*+,;=:@-._"  # characters of a path segment kept as they are when it is encoded again
PROBED = ("zarr.json", ".zattrs", ".zarray")  # an image's metadata: zarr 3, OME-Zarr 0.4 group, plain zarr 2 array
PROBE_ATTEMPTS = 2  # a server that is down is told at once: the proxy starts all the same, and each request retries
PROBE_TIMEOUT = httpx.Timeout(10.0)  # seconds: a server that hangs at the start is told too
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Answer:
    """An upstream's answer as the proxy passes it on: status, the headers kept, the body (empty for HEAD)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def encode(self) -> bytes:
        """The answer as one cache object: a JSON line of status and headers, then the body."""
        return json.dumps({"status": self.status, "headers": self.headers}).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Answer:
        head, body = data.split(b"\n", 1)
        fields = json.loads(head)
        return cls(int(fields["status"]), dict(fields["headers"]), body)


def check_upstream(url: str) -> str:
    """``url`` as the prefix every proxied URL starts with (``https://server/path/``).

    Raises
    ------
    UsageError
        For a URL that is not http(s), holds a login, or has no host.
    """
    if not url.lower().startswith(("https://", "http://")):
        raise UsageError(
            f"--proxy {url}: give the upstream's http:// or https:// address, such as https://server/path/"
        )
    if "?" in url or "#" in url:
        raise UsageError(f"--proxy {url}: give a folder's address, without a query (?) or fragment (#)")
    # As httpx writes it (scheme and host in lower case, the path percent-encoded): the URLs built from it are
    # compared with it in that form
    return str(httpx.URL(fetching.check_url(url) + "/"))


def proxy_login(host: str, user: str | None) -> httpx.BasicAuth | None:
    """The login sent upstream: ``host``'s ``~/.netrc`` entry (then ``user`` is not needed, and nothing is asked);
    else ``user`` with the password of :data:`fetching.PASSWORD_VARIABLE`, or asked at a prompt; else the
    environment's user and password; else none (a public server).

    Raises
    ------
    UsageError
        For a ``.netrc`` that cannot be read, or ``user`` without a password where none can be asked.
    """
    entry = fetching.netrc_login(host)
    if entry is not None:
        return entry
    if user is None:
        return fetching.login(host)
    password = os.environ.get(fetching.PASSWORD_VARIABLE)
    if not password:
        if not sys.stdin.isatty():
            raise UsageError(
                f"--user {user}: no password; set {fetching.PASSWORD_VARIABLE}, put the login in ~/.netrc (machine "
                f"{host} login {user} password ...), or run scroll_serve in a terminal to be asked"
            )
        try:
            password = getpass.getpass(f"password of {user} on {host}: ")
        except EOFError:  # Ctrl-D
            password = ""
        if not password:
            raise UsageError(f"--user {user}: no password given")
    return httpx.BasicAuth(user, password)


class Proxy:
    """The upstream's objects, fetched for the app of :meth:`app`.

    Parameters
    ----------
    upstream : str
        The prefix of every URL fetched, ending in ``/`` (:func:`check_upstream`).
    auth : httpx.BasicAuth or None
        The login sent upstream.
    cache : DiskCache or None
        Where answers are kept (``None``: nowhere).
    """

    def __init__(self, upstream: str, auth: httpx.BasicAuth | None, cache: DiskCache | None) -> None:
        self.upstream = upstream
        self.auth = auth
        self.cache = cache
        self._session: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._pending: dict[str, asyncio.Future[Answer]] = {}
        self._told: set[int] = set()
        # Answers fetched with a login are cached apart from a public run's: a run without one (which lets any
        # page read what it serves) never serves what a login fetched.
        self._kind = "public" if auth is None else "login"

    def app(self, origins: Sequence[str], hosts: Sequence[str] | None) -> object:
        """The ASGI app: GET and HEAD of any path, answered from the upstream, with CORS for ``origins`` and the
        ``Host`` names ``hosts`` (``None``: any); see :func:`scrollzarr.serving.with_cors`."""
        return with_cors([Route("/{path:path}", self._endpoint, methods=["GET", "HEAD"])], origins, hosts)

    def url_of(self, raw_path: str) -> str | None:
        """The upstream URL of a request's (percent-encoded) path, or ``None`` if it would leave the prefix."""
        segments = raw_path.lstrip("/").split("/")
        decoded = [urllib.parse.unquote(segment) for segment in segments]
        # An encoded / or \ would be a separator to a server that decodes, then normalises, the path (nginx does)
        if any(part in (".", "..") or any(c in part for c in "/\\\0") for part in decoded):
            return None
        url = self.upstream + "/".join(urllib.parse.quote(part, safe=SAFE) for part in decoded)
        return url if str(httpx.URL(url)).startswith(self.upstream) else None

    async def _endpoint(self, request: Request) -> Response:
        url = self.url_of(request.scope.get("raw_path", request.url.path.encode()).decode("latin-1"))
        if url is None:
            return PlainTextResponse("refused: the path leaves the proxied folder", status_code=403)
        headers = {"accept-encoding": "identity"}
        if "range" in request.headers:
            headers["range"] = request.headers["range"]
        try:
            return await self._answer(request.method, url, headers)
        except fetching.FetchError as error:
            log.warning("%s", error)
            return PlainTextResponse(f"the upstream did not answer: {error}", status_code=502)

    async def _answer(self, method: str, url: str, headers: dict[str, str]) -> Response:
        key = f"scroll_serve {self._kind} {method} {url} {headers.get('range', '')}"
        answer = await self._cached(key)
        pending = self._pending.get(key) if answer is None else None
        if pending is not None:
            try:
                answer = await asyncio.shield(pending)
            except _Streamed:  # that one streamed its answer through: this one gets a stream of its own
                fetched = await self._fetch(method, url, headers, key)
                if isinstance(fetched, Response):
                    return fetched
                answer = fetched
        if answer is None:
            fetched = await self._fetch_shared(method, url, headers, key)
            if isinstance(fetched, Response):
                return fetched
            answer = fetched
        return Response(answer.body, status_code=answer.status, headers=answer.headers)

    async def _fetch_shared(self, method: str, url: str, headers: dict[str, str], key: str) -> Answer | Response:
        """:meth:`_fetch`, its answer shared with the same requests made meanwhile."""
        pending = self._pending[key] = asyncio.get_running_loop().create_future()
        try:
            fetched = await self._fetch(method, url, headers, key)
        except BaseException as error:
            # A request cancelled (its client gone, the server stopping) is not the waiters' failure: they ask
            # themselves
            pending.set_exception(_Streamed() if isinstance(error, asyncio.CancelledError) else error)
            pending.exception()  # retrieved: the waiters, if any, raise it themselves
            raise
        finally:
            if self._pending.get(key) is pending:
                del self._pending[key]
        if isinstance(fetched, Response):
            pending.set_exception(_Streamed())
            pending.exception()
        else:
            pending.set_result(fetched)
        return fetched

    async def _cached(self, key: str) -> Answer | None:
        if self.cache is None:
            return None
        data = await asyncio.to_thread(self.cache.get, key)
        return None if data is None else Answer.decode(data)

    async def _fetch(self, method: str, url: str, headers: dict[str, str], key: str) -> Answer | Response:
        """The upstream's answer: kept (and cached) if it is small enough, else a response streaming it (which
        holds its slot among the :data:`CONNECTIONS` until the stream ends)."""
        session, slots = self._client()
        await slots.acquire()
        streaming = False
        try:
            for _ in range(MAX_REDIRECTS + 1):
                upstream = await fetching.get(session, url, headers, method=method, stream=True, refusal_is_error=False)
                if not (upstream.is_redirect and "location" in upstream.headers):
                    break
                await upstream.aclose()
                target = str(httpx.URL(url).join(upstream.headers["location"]))
                inside = (
                    target.startswith(self.upstream)
                    and self.url_of("/" + target[len(self.upstream) :].split("?")[0]) == target.split("?")[0]
                )  # the same refusals as a browser's paths: no dot segments, no %2F
                if not inside:  # the login, and this machine, stay inside the prefix
                    log.warning("%s redirects out of %s (to %s): not followed", url, self.upstream, target)
                    return Answer(502, {}, b"the upstream redirects out of the proxied folder")
                url = target
            else:
                return Answer(502, {}, b"the upstream redirects too many times")
            passed = {name: upstream.headers[name] for name in PASSED_HEADERS if name in upstream.headers}
            if upstream.status_code in (401, 403):
                await upstream.aclose()
                self._tell_refusal(upstream.status_code)
                return Answer(upstream.status_code, {}, b"")
            if method == "GET" and ("content-encoding" in upstream.headers or "content-length" not in passed):
                passed.pop("content-length", None)  # httpx decodes what a server compressed anyway: not its length
            length = int(passed.get("content-length", MAX_CACHED + 1))
            if method == "GET" and length > MAX_CACHED:
                streaming = True
                return StreamingResponse(_relay(upstream, slots), status_code=upstream.status_code, headers=passed)
            try:
                body = await upstream.aread()
            finally:
                await upstream.aclose()
        finally:
            if not streaming:
                slots.release()
        answer = Answer(upstream.status_code, passed, body)
        if self.cache is not None and upstream.status_code in CACHED_STATUSES:
            await asyncio.to_thread(self.cache.put, key, answer.encode())
        return answer

    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        if self._session is None or self._slots is None:  # made on the server's event loop, at its first request
            # Redirects are followed by _fetch, only inside the prefix
            self._session = fetching.client(self.upstream, CONNECTIONS, self.auth, follow_redirects=False)
            self._slots = asyncio.Semaphore(CONNECTIONS)
        return self._session, self._slots

    async def holds_metadata(self) -> bool:
        """Whether the upstream prefix itself is a zarr store (so that scroll_serve prints a link to it).

        A refused login or an upstream that does not answer is told (a warning, once) and taken as no: the proxy
        serves anyway, and the browser then gets the upstream's 401, or each request tries again.  Run on an event
        loop of its own, before the server's: a client of its own, closed at the end.
        """
        async with fetching.client(self.upstream, len(PROBED), self.auth, PROBE_TIMEOUT) as session:
            for name in PROBED:
                try:
                    response = await fetching.get(
                        session, self.upstream + name, refusal_is_error=False, attempts=PROBE_ATTEMPTS
                    )
                except fetching.FetchError as error:
                    log.warning("%s; proxying it anyway", error)
                    return False
                if response.status_code in (401, 403):
                    self._tell_refusal(response.status_code)
                    return False
                if response.status_code == 200 and not response.headers.get("content-type", "").startswith("text/"):
                    return True
        return False

    def _tell_refusal(self, status: int) -> None:
        """Log once per status what to do about a login the upstream refused (never the login itself)."""
        if status not in self._told:
            self._told.add(status)
            log.warning("%s", refusal(self.upstream, status, self.auth is not None))


def refusal(upstream: str, status: int, logged_in: bool) -> str:
    """What to do about an upstream answering 401 or 403: one line, without the login."""
    what = "refused the login" if logged_in else "asks for a login"
    return (
        f"{upstream} {what} (HTTP {status}); put the login in ~/.netrc (machine {httpx.URL(upstream).host} login "
        f"NAME password ...), or give --user NAME and the password in {fetching.PASSWORD_VARIABLE} or at the prompt"
    )


async def _relay(upstream: httpx.Response, slot: asyncio.Semaphore) -> AsyncIterator[bytes]:
    """The upstream's body as it comes; its connection closed and its slot freed at the end, however it ends
    (the browser gone too)."""
    try:
        async for piece in upstream.aiter_bytes():
            yield piece
    finally:
        await upstream.aclose()
        slot.release()


class _Streamed(Exception):
    """A request made while the same one streamed through: it asks the upstream itself."""
