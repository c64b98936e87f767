"""Read-only zarr stores of volumes on a web server (``https://``) or in a bucket (``s3://``), behind a disk cache.

zarr reads them as any store (zarr 2 or 3, every codec, sharding): a chunk
is one GET, an inner chunk of a shard a GET of its byte range (after its
shard's index, a suffix range).  What is fetched is kept in a
:class:`~scrollzarr.diskcache.DiskCache` (``--cache_dir``), by URL and
byte range, so that a second render of a segment reads the disk, not the
network.  Metadata (``.zarray``, ``zarr.json`` …) is always fetched, so that
a volume replaced on the server is seen; the chunks are taken to be what
they were (published volumes do not change; empty the cache otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import threading
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from scrollzarr import fetching
from scrollzarr.diskcache import DiskCache
from scrollzarr.errors import UsageError
from scrollzarr.sizes import GIB

log = logging.getLogger(__name__)

SCHEMES = ("https://", "http://", "s3://")
METADATA = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")  # fetched at every open, never kept
# Requests in flight at once (chunks fetched ahead of the tiles that need them, see layers.Prefetch): with 20 ms
# of latency a request, the bench segment (433 chunks of 4 MiB) rendered in 1.10 x the time from disk
# (bench/RESULTS_ppm_to_layers.md); the data server answers bursts of many more with 429.
FETCHES = 16
# Objects kept in memory besides the disk cache: a shard's index (16 bytes a chunk, plus 4) is read again for every
# chunk read from the shard, and a missing disk cache must not make that a request each time.
SMALL = 64 * 2**10
SMALL_BYTES = 16 * 2**20


def is_url(source: str | Path) -> bool:
    """Whether ``source`` names a remote volume rather than a path."""
    return isinstance(source, str) and source.startswith(SCHEMES)


def volume_source(text: str) -> Path | str:
    """A volume named on the command line: a URL (its scheme in small letters), else a path.

    Raises
    ------
    argparse.ArgumentTypeError
        For a URL of a scheme that is not read (``ftp://`` …).
    """
    scheme, separator, rest = text.partition("://")
    if separator and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        if f"{scheme.lower()}://" not in SCHEMES:
            raise argparse.ArgumentTypeError(
                f"{text}: {scheme}:// is not read; give an https://, http:// or s3:// URL, or a path"
            )
        return f"{scheme.lower()}://{rest}"
    return Path(text)


@dataclass(frozen=True)
class CacheSettings:
    """Where remote objects are kept on disk: ``directory`` (``None``: not kept), at most ``max_bytes``."""

    directory: Path | None
    max_bytes: int


def cache_settings(directory: Path | None, gb: float) -> CacheSettings:
    """The disk cache of ``--cache_dir`` (default ``$XDG_CACHE_HOME/scrollzarr``, else ``~/.cache/scrollzarr``) and
    ``--cache_gb`` (0: none).

    Raises
    ------
    UsageError
        For a ``gb`` that is negative or not a number.
    """
    if not (math.isfinite(gb) and gb >= 0):
        raise UsageError(f"--cache_gb must be 0 (no disk cache) or a positive number of GB, not {gb}")
    if gb == 0:
        return CacheSettings(None, 0)
    if directory is None:
        directory = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scrollzarr"
    return CacheSettings(directory.absolute(), int(gb * GIB))


@dataclass
class FetchStats:
    """Chunk objects (chunks, shard indexes, byte ranges of shards; not metadata, not missing objects) a process
    fetched over the network, their bytes, and those its disk cache served."""

    fetched: int = 0
    nbytes: int = 0
    cached: int = 0


class _ReadOnly(Store):
    """What both stores here share: read-only, objects read through :meth:`fetch` (bytes, or ``None`` for an
    object that is not there)."""

    supports_writes = False
    supports_deletes = False
    supports_listing = False
    url: str

    def __init__(self) -> None:
        super().__init__(read_only=True)

    def __str__(self) -> str:
        return self.url

    __hash__ = None  # type: ignore[assignment]

    @abstractmethod
    async def fetch(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """The bytes of ``key`` (its range ``byte_range``), or ``None`` if there is no such object."""

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        data = await self.fetch(key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError(f"{self.url} is read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError(f"{self.url} is read-only")


class HttpStore(_ReadOnly):
    """The objects under ``url`` on a web server, read-only; a missing object (404) is a missing chunk.  Logged in
    with ``auth``, else with :func:`fetching.login` of its host."""

    def __init__(self, url: str, auth: httpx.BasicAuth | None = None) -> None:
        super().__init__()
        self.url = fetching.check_url(url)
        # a .netrc that cannot be read is told before anything is fetched
        self.auth = auth or fetching.login(httpx.URL(self.url).host)
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HttpStore) and other.url == self.url

    async def fetch(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """The bytes of ``key`` (its range ``byte_range``), or ``None`` if the server has no such object."""
        headers = None if byte_range is None else {"Range": _range_header(byte_range)}
        response = await fetching.get(self._client(), f"{self.url}/{key}", headers)
        if response.status_code in (404, 410):
            return None
        if response.headers.get("content-type", "").startswith("text/html"):
            # No object of a zarr store is a web page: a server that answers a missing file with one (a custom "not
            # found" page sent as 200) is saying it has no such object.
            return None
        if response.status_code == 416:  # a range past the end of the object
            return b""
        if response.status_code not in (200, 206):
            raise fetching.FetchError(
                f"{self.url}/{key} could not be fetched: HTTP {response.status_code} {response.reason_phrase}"
            )
        data = response.content
        if response.status_code == 200 and byte_range is not None:  # a server that ignores Range sends it all
            data = _cut(data, byte_range)
        return data

    async def exists(self, key: str) -> bool:
        return await self.fetch(key, RangeByteRequest(0, 1)) is not None

    def list(self) -> AsyncIterator[str]:
        raise NotImplementedError("a web server's objects cannot be listed")

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        raise NotImplementedError("a web server's objects cannot be listed")

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        raise NotImplementedError("a web server's objects cannot be listed")

    def _client(self) -> httpx.AsyncClient:
        """The client of the running event loop (zarr runs its own; a client cannot change loops)."""
        loop = asyncio.get_running_loop()
        session = self._clients.get(loop)
        if session is None:
            session = self._clients[loop] = fetching.client(self.url, FETCHES, self.auth)
        return session


class CachedStore(_ReadOnly):
    """``inner``'s objects, each fetched once while it stays in ``cache`` (``None``: fetched every time), counted
    into ``stats``."""

    def __init__(self, inner: Store, url: str, cache: DiskCache | None) -> None:
        super().__init__()
        self.inner = inner
        self.url = url
        self.cache = cache
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._pending: dict[str, asyncio.Future[bytes | None]] = {}
        self._small: OrderedDict[str, bytes] = OrderedDict()
        self._small_bytes = 0
        self._failure: fetching.FetchError | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CachedStore) and other.inner == self.inner

    async def fetch(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """The bytes of ``key`` (its range ``byte_range``): from memory (small objects), the disk cache, a request
        for the same object already in flight, or the network, in that order; ``None`` if there is no such object."""
        if key.rsplit("/", 1)[-1] in METADATA:
            buffer = await self.inner.get(key, default_buffer_prototype(), byte_range)
            return None if buffer is None else buffer.to_bytes()
        name = f"{self.url}/{key}#{_range_header(byte_range) if byte_range else ''}"
        with self._lock:
            data = self._small.get(name)
            if data is not None:
                self._small.move_to_end(name)
                return data
        if self._failure is not None:  # the server failed for good: the next requests would wait it out again
            raise fetching.FetchError(str(self._failure))
        pending = self._pending.get(name)  # on zarr's event loop: no other coroutine runs meanwhile
        if pending is not None:
            return await asyncio.shield(pending)
        pending = self._pending[name] = asyncio.get_running_loop().create_future()
        try:
            data = await self._load(key, byte_range, name)
        except BaseException as error:
            if isinstance(error, fetching.FetchError):
                self._failure = error
            pending.set_exception(error)
            pending.exception()  # retrieved: the waiters, if any, raise it themselves
            raise
        finally:
            del self._pending[name]
        pending.set_result(data)
        return data

    async def _load(self, key: str, byte_range: ByteRequest | None, name: str) -> bytes | None:
        if self.cache is not None:
            data = await asyncio.to_thread(self.cache.get, name)
            if data is not None:
                with self._lock:
                    self.stats.cached += 1
                self._keep_small(name, data)
                return data
        buffer = await self.inner.get(key, default_buffer_prototype(), byte_range)
        if buffer is None:
            return None
        data = buffer.to_bytes()
        with self._lock:
            self.stats.fetched += 1
            self.stats.nbytes += len(data)
        if self.cache is not None:
            await asyncio.to_thread(self.cache.put, name, data)
        self._keep_small(name, data)
        return data

    async def probe(self) -> None:
        """Fetch the store's zarr 3 metadata (there or not), to tell a server or bucket that cannot be reached in one
        line before zarr asks for several objects at once.

        Raises
        ------
        FetchError
        """
        try:
            await self.inner.get("zarr.json", default_buffer_prototype())
        except fetching.FetchError:
            raise
        except Exception as error:  # s3fs and botocore raise many kinds for endpoints, networks and credentials
            raise fetching.FetchError(
                f"{self.url} cannot be reached ({type(error).__name__}: {error}); check the URL, the network and "
                "the credentials"
            ) from None

    def _keep_small(self, name: str, data: bytes) -> None:
        """Keep ``data`` in memory if it is small: a shard's index is read again for every chunk of the shard."""
        if len(data) > SMALL:
            return
        with self._lock:
            self._small[name] = data
            self._small_bytes += len(data)
            while self._small_bytes > SMALL_BYTES:
                _, old = self._small.popitem(last=False)
                self._small_bytes -= len(old)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    def list(self) -> AsyncIterator[str]:
        return self.inner.list()

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self.inner.list_prefix(prefix)

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self.inner.list_dir(prefix)


def open_store(url: str, settings: CacheSettings, auth: httpx.BasicAuth | None = None) -> CachedStore:
    """The store of the volume at ``url`` (``https://``, ``http://`` or ``s3://``), behind the disk cache of
    ``settings``; a web server's logged in with ``auth`` (default: :func:`fetching.login`).

    Raises
    ------
    UsageError
        For a URL with a login in it, a ``.netrc`` that cannot be read, or ``s3://`` without s3fs.
    """
    url = fetching.check_url(url)
    inner: Store = _s3_store(url) if url.startswith("s3://") else HttpStore(url, auth)
    cache = None
    if settings.directory is not None:
        try:
            cache = DiskCache(settings.directory, settings.max_bytes)
        except OSError as error:
            if settings.directory not in _WARNED:  # once, not at each of the process's opens of the volume
                _WARNED.add(settings.directory)
                log.warning("no disk cache (%s cannot be used: %s); every chunk is fetched", settings.directory, error)
    store = CachedStore(inner, url, cache)
    sync(store.probe())
    return store


_WARNED: set[Path] = set()


def _s3_store(url: str) -> Store:
    """An ``s3://`` prefix through s3fs, anonymous when no credentials are found (the open-data bucket is public)."""
    try:
        import botocore.session
        import s3fs  # noqa: F401 (fsspec finds it by the scheme; imported to tell its absence in one line)
    except ImportError:
        raise UsageError(
            'reading from s3:// needs s3fs, which is not installed: pip install "scrollzarr[s3]"'
        ) from None
    options: dict[str, Any] = {}
    if botocore.session.get_session().get_credentials() is None:
        options["anon"] = True
    if os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return FsspecStore.from_url(url, storage_options=options, read_only=True)


def _range_header(byte_range: ByteRequest) -> str:
    if isinstance(byte_range, RangeByteRequest):
        return f"bytes={byte_range.start}-{byte_range.end - 1}"
    if isinstance(byte_range, OffsetByteRequest):
        return f"bytes={byte_range.offset}-"
    if isinstance(byte_range, SuffixByteRequest):
        return f"bytes=-{byte_range.suffix}"
    raise TypeError(f"unknown byte range {byte_range!r}")


def _cut(data: bytes, byte_range: ByteRequest) -> bytes:
    """The part of the whole object ``data`` that ``byte_range`` asks for."""
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix :] if byte_range.suffix else b""
    raise TypeError(f"unknown byte range {byte_range!r}")
