"""HTTP requests that survive a busy server: retried with backoff, logins from ``~/.netrc`` or the environment.

The public data server answers bursts with 429 and, now and then, a 5xx or
a dropped connection; a render fetches thousands of objects, and one lost
request must not stop it.  A request is retried on 429, 500, 502, 503, 504,
timeouts and connection errors, waiting as the server's ``Retry-After``
says, else 0.5 s doubling up to 30 s, for :data:`ATTEMPTS` attempts (about
a minute of backoff in all).  :func:`stop` ends every retry of the process
at once (Ctrl-C: the run stops, it does not wait out the backoff).

Logins never come from the command line (it is visible to every user of the
machine, and stays in shell histories): a URL with a user name in it is
refused; ``~/.netrc`` (or the file ``NETRC`` names) is read as curl and git
read it, and otherwise ``SCROLLZARR_HTTP_USER`` and
``SCROLLZARR_HTTP_PASSWORD``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import netrc
import os
import re
import threading
import time
from pathlib import Path

import httpx

from scrollzarr.errors import ScrollzarrError, UsageError

log = logging.getLogger(__name__)

RETRIED = frozenset({429, 500, 502, 503, 504})
ATTEMPTS = 8
FIRST_WAIT = 0.5  # seconds, doubled at each attempt
MAX_WAIT = 30.0  # seconds between two attempts, whatever Retry-After says
USER_VARIABLE = "SCROLLZARR_HTTP_USER"
PASSWORD_VARIABLE = "SCROLLZARR_HTTP_PASSWORD"
HOST = re.compile(r"[A-Za-z0-9._~:-]+")  # a name (IDNA-encoded by httpx), an IPv4 or IPv6 address
TIMEOUT = httpx.Timeout(60.0, connect=15.0)  # a 128³ uint16 chunk (4 MiB) at 1 Mbit/s takes 34 s


class FetchError(ScrollzarrError):
    """A request that failed for good."""


_STOPPED = threading.Event()
STEP = 0.1  # seconds: how often a wait before a retry looks whether the process is stopping


def stop() -> None:
    """Give up every request of this process that waits to be retried, and every retry to come."""
    _STOPPED.set()


def check_url(url: str) -> str:
    """``url`` without a trailing ``/``, refused if it holds a login.

    Raises
    ------
    UsageError
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise UsageError(
            f"{url} is not a valid URL ({error}); give one such as https://server/path/volume.zarr"
        ) from None
    if parsed.userinfo:
        raise UsageError(
            f"{parsed.copy_with(username=None, password=None)}: a login does not belong on the command line (every "
            f"user of the machine sees it); put it in ~/.netrc (machine {parsed.host} login NAME password ...) or "
            f"in {USER_VARIABLE} and {PASSWORD_VARIABLE}"
        )
    if not parsed.host or not HOST.fullmatch(parsed.host):
        raise UsageError(f"{url} has no valid host name; give a URL such as https://server/path/volume.zarr")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise UsageError(f"{url}: the port must be between 1 and 65535, not {parsed.port}")
    return url.rstrip("/")


def netrc_login(host: str) -> httpx.BasicAuth | None:
    """``host``'s entry in ``~/.netrc`` (or the file ``NETRC`` names), as curl and git read it, or ``None``.

    Raises
    ------
    UsageError
        For a ``.netrc`` that cannot be parsed.
    """
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if path.is_file():
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError, ValueError) as error:  # ValueError: not text (UnicodeDecodeError)
            raise UsageError(f"{path} cannot be read ({error}); fix it, or move it away") from None
        if entry is not None and entry[2]:
            return httpx.BasicAuth(entry[0], entry[2])
    return None


def login(host: str) -> httpx.BasicAuth | None:
    """The login for ``host``: its ``~/.netrc`` entry, else the environment's, else none.

    Raises
    ------
    UsageError
        For a ``.netrc`` that cannot be parsed, or a user name without a password in the environment.
    """
    entry = netrc_login(host)
    if entry is not None:
        return entry
    user, password = os.environ.get(USER_VARIABLE), os.environ.get(PASSWORD_VARIABLE)
    if user and not password:
        raise UsageError(f"{USER_VARIABLE} is set but {PASSWORD_VARIABLE} is not; set both, or neither")
    return httpx.BasicAuth(user, password) if user and password else None


def client(
    url: str,
    connections: int,
    auth: httpx.BasicAuth | None = None,
    timeout: httpx.Timeout = TIMEOUT,
    follow_redirects: bool = True,
) -> httpx.AsyncClient:
    """An async client for requests under ``url``, with at most ``connections`` open, logged in with ``auth``
    (default: :func:`login` of its host)."""
    return httpx.AsyncClient(
        auth=auth or login(httpx.URL(url).host),
        timeout=timeout,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        follow_redirects=follow_redirects,  # httpx drops the login on a redirect to another host
    )


async def get(
    session: httpx.AsyncClient,
    url: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    stream: bool = False,
    refusal_is_error: bool = True,
    attempts: int = ATTEMPTS,
) -> httpx.Response:
    """GET ``url``, retried while the server is busy or the network fails; the final response, whatever its status.

    Parameters
    ----------
    method : str
        ``"GET"`` or ``"HEAD"``.
    stream : bool
        Return once the headers are in; the caller reads the body, and closes the response.
    refusal_is_error : bool
        Raise for a 401 or 403 (with what to do about the login); otherwise return it, as a proxy does.
    attempts : int
        Requests made at most.

    Raises
    ------
    FetchError
        If every attempt failed (the last status or error named), or the server asks for a login it was not given.
    """
    failure = ""
    for attempt in range(attempts):
        if _STOPPED.is_set():
            raise FetchError(f"{url}: not fetched, the run is stopping")
        try:
            response = await session.send(session.build_request(method, url, headers=headers), stream=stream)
        except httpx.TransportError as error:  # timeouts, refused and dropped connections
            failure, wait = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__, None
        else:
            if response.status_code not in RETRIED:
                if response.status_code in (401, 403) and refusal_is_error:
                    await response.aclose()
                    raise FetchError(_refused(url, response.status_code, session.auth is not None))
                return response
            await response.aclose()
            failure, wait = f"HTTP {response.status_code}", _retry_after(response)
        if attempt + 1 < attempts:
            delay = min(MAX_WAIT, FIRST_WAIT * 2**attempt if wait is None else wait)
            log.debug("%s: %s; trying again in %.1f s", url, failure, delay)
            waited = 0.0
            while waited < delay and not _STOPPED.is_set():
                await asyncio.sleep(min(STEP, delay - waited))
                waited += STEP
    raise FetchError(f"{url} could not be fetched: {failure} after {attempts} attempts; try again later")


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds ``Retry-After`` asks for (a number, or an HTTP date), or ``None``."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _refused(url: str, status: int, logged_in: bool) -> str:
    host = httpx.URL(url).host
    if logged_in:
        return (
            f"{url}: the server refused the login (HTTP {status}); check the entry for {host} in ~/.netrc, or "
            f"{USER_VARIABLE} and {PASSWORD_VARIABLE}"
        )
    if status == 403:
        return (
            f"{url}: the server refuses access (HTTP 403); if it needs a login, put it in ~/.netrc (machine {host} "
            f"login NAME password ...) or in {USER_VARIABLE} and {PASSWORD_VARIABLE}"
        )
    return (
        f"{url}: the server asks for a login (HTTP {status}); put it in ~/.netrc (machine {host} login NAME "
        f"password ...) or in {USER_VARIABLE} and {PASSWORD_VARIABLE}"
    )
