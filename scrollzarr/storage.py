"""Where a store's objects go: a directory on a file system, or a prefix in an S3 bucket.

One small interface (:class:`Storage`: ``put``, ``get``, ``exists``, ``listing``,
``delete``, ``sync``) carries everything scrollzarr writes itself besides the
unit files (the progress record, the list of slice files, the task markers);
the unit files go through the sinks (:mod:`scrollzarr.sinks`), which write a
local file atomically with direct I/O or, on S3, put the whole unit as one
object; zarr's metadata goes through zarr's own stores (:func:`zarr_store`).

* :class:`LocalStorage`: keys are paths under a directory; ``put`` writes a
  temporary file, flushes it and renames it in (:func:`~scrollzarr.durable.write_durably`).
* :class:`ObjectStore`: keys are objects under ``s3://bucket/prefix``, through
  s3fs.  An object PUT is atomic (a reader sees the old object or the whole new
  one), so nothing is written under a temporary name, and there is nothing to
  flush.  The endpoint and the credentials come from the environment, as
  botocore reads them (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ...), in every process that opens
  the store: an :class:`ObjectStore` is a plain value (its URL) that crosses
  process boundaries, and each process makes its own client.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from scrollzarr.durable import remove_durably, sync_file_system, write_durably
from scrollzarr.errors import ScrollzarrError, UsageError

SCHEME = "s3://"
# s3fs keeps listings of "directories" by default; a run lists what other processes (Dask workers) wrote
STORAGE_OPTIONS: dict[str, Any] = {"use_listings_cache": False}


class Storage(Protocol):
    """A store's objects by key (``/``-separated, relative to the store's root)."""

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` whole: a reader sees the old bytes or the new, never a part."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; ``FileNotFoundError`` if there are none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object (a file) is under ``key``."""
        ...

    def listing(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (a "folder": ``""`` for the whole store), at any depth."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object under ``key``, if there is one."""
        ...

    def delete_all(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (a "folder")."""
        ...

    def sync(self) -> None:
        """Make everything written so far durable before what is written next."""
        ...


@dataclass(frozen=True)
class ObjectStore:
    """A store at ``s3://bucket/prefix``: the output's location and its :class:`Storage`, as one plain value.

    It answers the few questions the tools ask of an output path (``name``,
    ``stem``, ``suffix``, ``/``), so that a level's location is ``store / "0"``
    whether the store is a directory or a prefix.

    Attributes
    ----------
    url : str
        ``s3://bucket/prefix``, without a trailing ``/``.
    """

    url: str

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, key: str) -> ObjectStore:
        return ObjectStore(f"{self.url}/{key}")

    @property
    def name(self) -> str:
        return PurePosixPath(self._path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self._path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self._path).suffix

    @property
    def bucket(self) -> str:
        return self._path.split("/", 1)[0]

    @property
    def _path(self) -> str:
        """``bucket/prefix``, as s3fs names objects."""
        return self.url.removeprefix(SCHEME)

    def _key(self, key: str) -> str:
        return f"{self._path}/{key}" if key else self._path

    @property
    def fs(self) -> Any:
        """This process's s3fs file system (made on first use: a client does not cross process boundaries)."""
        return _filesystem()

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(key), bytes(data))

    def get(self, key: str) -> bytes:
        data = self.fs.cat_file(self._key(key))
        assert isinstance(data, bytes)
        return data

    def exists(self, key: str) -> bool:
        return bool(self.fs.isfile(self._key(key)))

    def listing(self, prefix: str = "") -> list[str]:
        root = self._key(prefix).rstrip("/") + "/"
        start = len(self._path) + 1
        return [str(found)[start:] for found in self.fs.find(root)]

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` (as :meth:`listing`) with its object's size in bytes."""
        root = self._key(prefix).rstrip("/") + "/"
        start = len(self._path) + 1
        return {str(name)[start:]: int(info["size"]) for name, info in self.fs.find(root, detail=True).items()}

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(key))

    def delete_all(self, prefix: str) -> None:
        self.delete_keys(self.listing(prefix))

    def delete_keys(self, keys: list[str]) -> None:
        """Delete the objects under ``listing`` (s3fs deletes up to 1000 in one request)."""
        if keys:
            self.fs.rm([self._key(key) for key in keys])

    def sync(self) -> None:
        """Nothing to flush: an object is durable once its PUT is answered."""

    def check_bucket(self) -> None:
        """Refuse a bucket that does not exist or cannot be reached, in one line that says what to do.

        Raises
        ------
        ScrollzarrError
        """
        from fsspec.asyn import sync

        fs = self.fs
        try:
            # HEAD of the bucket: s3fs' exists() answers False for an endpoint it cannot reach, too
            sync(fs.loop, fs._call_s3, "head_bucket", Bucket=self.bucket)
        except FileNotFoundError:
            raise ScrollzarrError(
                f"the bucket {self.bucket} of the output {self.url} does not exist; create it first, or check the "
                "URL and AWS_ENDPOINT_URL"
            ) from None
        except Exception as error:  # botocore and s3fs raise many kinds for credentials, endpoints and networks
            raise ScrollzarrError(
                f"cannot reach the bucket of the output {self.url} ({type(error).__name__}: {error}); check "
                "AWS_ENDPOINT_URL and the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)"
            ) from None


@functools.lru_cache(maxsize=1)
def _filesystem() -> Any:
    import fsspec

    try:
        return fsspec.filesystem("s3", **STORAGE_OPTIONS)
    except ImportError:
        raise UsageError('writing to s3:// needs s3fs, which is not installed: pip install "scrollzarr[s3]"') from None


class LocalStorage:
    """A store in the directory ``root``: keys are paths under it, written durably."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, data)

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def listing(self, prefix: str = "") -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        return [str(path.relative_to(self.root)) for path in folder.rglob("*") if path.is_file()]

    def delete(self, key: str) -> None:
        remove_durably(self.root / key)

    def delete_all(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)

    def sync(self) -> None:
        """Flush the file system that holds the store (one ``syncfs``: :func:`~scrollzarr.durable.sync_file_system`)."""
        sync_file_system(self.root)


# The output of a tool: a directory, or a prefix in a bucket.
Location = Path | ObjectStore


def storage(location: Location) -> Storage:
    """The :class:`Storage` of the store at ``location``."""
    return location if isinstance(location, ObjectStore) else LocalStorage(location)


def parse_location(text: str) -> Location:
    """An output as given on the command line: ``s3://bucket/prefix`` or a path.

    Raises
    ------
    UsageError
        For a URL of another kind, or an ``s3://`` URL without a bucket and a prefix.
    """
    if "://" not in text:
        return Path(text)
    if not text.startswith(SCHEME):
        scheme = text.split("://", 1)[0]
        raise UsageError(f"output {text}: {scheme}:// is not supported; give a path, or s3://BUCKET/PREFIX.zarr")
    path = text.removeprefix(SCHEME).strip("/")
    if "/" not in path or "//" in path:
        raise UsageError(f"output {text}: give the bucket and a prefix in it, as s3://BUCKET/PREFIX.zarr")
    return ObjectStore(SCHEME + path)


def zarr_store(location: Location, read_only: bool = False) -> Any:
    """What zarr opens for the store (or array) at ``location``: its path, or an fsspec store of the URL."""
    if isinstance(location, Path):
        return str(location)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(location.url, storage_options=STORAGE_OPTIONS, read_only=read_only)
