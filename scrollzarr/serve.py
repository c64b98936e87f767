"""What scroll_serve does: serve a folder of stores, or proxy a remote server, and print the Neuroglancer links."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import webbrowser
from dataclasses import dataclass
from pathlib import Path

import httpx

from scrollzarr import serving, viewerlink
from scrollzarr.diskcache import DiskCache
from scrollzarr.errors import UsageError
from scrollzarr.fetching import FetchError
from scrollzarr.proxy import Proxy, check_upstream, proxy_login
from scrollzarr.remote import CacheSettings, open_store

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 20  # the longest the start waits for a proxied store's sample (its contrast)


@dataclass(frozen=True)
class ServeOptions:
    """scroll_serve's options.

    Attributes
    ----------
    bind : str
        The address listened on (127.0.0.1: this machine only).
    port : int
        The port (0: any free one, told).
    app : str
        The Neuroglancer app the links open.
    open_browser : bool
        Open the link in the default browser (``$BROWSER`` if set).
    log_requests : bool
        One line per request answered.
    """

    bind: str = serving.LOOPBACK
    port: int = 9000
    app: str = viewerlink.DEFAULT_APP
    open_browser: bool = False
    log_requests: bool = False

    def check(self) -> None:
        """Raises :class:`UsageError` for a port out of range or an app that is not a web address."""
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 (any free port) and 65535, not {self.port}")
        try:
            host = httpx.URL(self.app).host if self.app.lower().startswith(("https://", "http://")) else ""
        except httpx.InvalidURL:
            host = ""
        if not host:
            raise UsageError(f"--neuroglancer {self.app}: give the app's address, such as {viewerlink.DEFAULT_APP}")

    @property
    def origin(self) -> str:
        """The origin (scheme, host, port) of the Neuroglancer app's pages."""
        url = httpx.URL(self.app)
        port = f":{url.port}" if url.port is not None else ""
        host = url.raw_host.decode("ascii")  # IDNA-encoded, as a browser sends it in Origin
        host = f"[{host}]" if ":" in host else host
        return f"{url.scheme}://{host}{port}"

    @property
    def address(self) -> str:
        """``--bind`` without the brackets of an IPv6 address (``[::1]``)."""
        return self.bind.strip("[]")


def serve_folder(root: Path, options: ServeOptions) -> None:
    """Serve ``root`` (a store, or a folder of them) read-only, printing a Neuroglancer link for each store.

    Raises
    ------
    UsageError
        For a ``root`` that is not a folder, or an address or port that cannot be listened on.
    """
    options.check()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise UsageError(f"{root} {what}; give a zarr store or a folder of stores")
    sock = _listen(options)
    stores = viewerlink.find_stores(root)
    base = serving.base_url(sock)
    log.info("serving %s read-only at %s/ (Ctrl-C to stop)", root, base)
    if not stores:
        log.warning(
            "no zarr store found in %s (searched %d folders deep); its files are served all the same",
            root,
            viewerlink.DEPTH,
        )
    links = []
    for store in stores:
        name = Path(store.path).name if store.path else root.absolute().name
        link = viewerlink.neuroglancer_url(options.app, base, store, name)
        links.append(link)
        low, high = store.contrast
        log.info(
            "%s: zarr %d, %s, contrast %g to %g",
            store.path or root.absolute().name,
            store.zarr_format,
            store.dtype,
            low,
            high,
        )
        _print(f"{store.path or '.'}: {link}")
    _open(links, options)
    app = serving.folder_app(root, serving.loopback_hosts(options.address))
    serving.run(app, sock, options.log_requests)


def serve_proxy(upstream: str, user: str | None, cache: CacheSettings, options: ServeOptions) -> None:
    """Serve the upstream's files on this machine, logged in, retried and cached; print a Neuroglancer link if the
    upstream is itself a store.

    Raises
    ------
    UsageError
        For an upstream that is not a web address, a login that cannot be had, or a port that cannot be listened on.
    """
    options.check()
    upstream = check_upstream(upstream)
    auth = proxy_login(httpx.URL(upstream).host, user)
    disk = None
    if cache.directory is not None:
        try:
            disk = DiskCache(cache.directory, cache.max_bytes)
        except OSError as error:
            log.warning("no disk cache (%s cannot be used: %s); every request goes upstream", cache.directory, error)
    proxy = Proxy(upstream, auth, disk)
    sock = _listen(options)
    store = _upstream_store(proxy, cache)
    base = serving.base_url(sock)
    log.info("proxying %s at %s/ (Ctrl-C to stop)", upstream, base)
    links = []
    if store is not None:
        name = httpx.URL(upstream).path.rstrip("/").rsplit("/", 1)[-1] or "volume"
        links.append(viewerlink.neuroglancer_url(options.app, base, store, name))
        _print(f"{upstream}: {links[0]}")
    else:
        log.info("add a store below it in Neuroglancer as zarr2://%s/PATH/ (zarr 2) or zarr3://%s/PATH/", base, base)
    _open(links, options)
    # What a login fetched is for the Neuroglancer app's pages only: with "*", any site the user visits could read
    # it through this proxy.  A public server's files may go to any page, as the server itself gives them.
    origins = ["*"] if auth is None else [options.origin]
    app = proxy.app(origins, serving.loopback_hosts(options.address))
    serving.run(app, sock, options.log_requests)  # type: ignore[arg-type]


def _upstream_store(proxy: Proxy, cache: CacheSettings) -> viewerlink.StoreFound | None:
    """The image at the upstream prefix itself, or ``None`` if it holds no zarr metadata (a folder of stores), or
    cannot be read now (told)."""
    if not asyncio.run(proxy.holds_metadata()):
        return None
    found: list[viewerlink.StoreFound | None] = []

    def describe(sample: bool) -> None:
        try:
            found.append(viewerlink.describe(open_store(proxy.upstream, cache, proxy.auth), "", sample=sample))
        except FetchError as error:
            log.warning("%s; proxying it anyway", error)
            found.append(None)

    # The contrast's sample is a few chunks of the lowest level, fetched over the network: a server that hangs
    # on them does not hold up the start (the link then has the data type's range).
    for sample in (True, False):
        worker = threading.Thread(target=describe, args=(sample,), daemon=True)
        worker.start()
        worker.join(SAMPLE_SECONDS)
        if found:
            return found[0]
        what = "no sample for the contrast" if sample else "no metadata either: no link"
        log.warning("the upstream is slow: %s within %d s", what, SAMPLE_SECONDS)
    return None


def _listen(options: ServeOptions) -> socket.socket:
    sock = serving.bind(options.address, options.port)
    if options.address not in serving.LOOPBACKS:
        log.warning(
            "listening on %s: every machine that reaches this one on port %d can read what is served",
            options.bind,
            sock.getsockname()[1],
        )
    return sock


def _open(links: list[str], options: ServeOptions) -> None:
    if not options.open_browser or not links:
        return
    if len(links) > 1:
        log.info("opening the first of the %d links in the browser", len(links))
    # On a thread of its own: a browser command that waits until its window closes ($BROWSER, say) does not hold
    # up the server
    threading.Thread(target=_open_link, args=(links[0],), daemon=True).start()


def _open_link(link: str) -> None:
    if not webbrowser.open(link):
        log.warning("no browser could be opened; open the link printed above")


def _print(line: str) -> None:
    """A link on stdout; once stdout is gone (``scroll_serve . | head -1``), the server goes on without it."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's own flush at exit finds nothing to write
        os.dup2(devnull, sys.stdout.fileno())
