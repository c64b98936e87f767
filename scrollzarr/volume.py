"""Opening a zarr volume to sample: a plain array, or one level of an OME-Zarr group.

Scroll coordinates (full-resolution voxels of the whole scan, z, y, x) map to
the array's indices through the level's OME ``scale`` and ``translation``,
measured in units of level 0's voxel: ``index = (c · s0 - t) / s``.  For
this project's stores (scales 1, 2, 4, …; translation = the crop's corner)
that is ``(c - corner) / 2^level``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import LocalStore, StoreLike

from scrollzarr import ngff, progress
from scrollzarr.blocks import Shape3, shape3
from scrollzarr.errors import ScrollzarrError
from scrollzarr.ngff_v04 import Multiscale
from scrollzarr.remote import CacheSettings, is_url, open_store
from scrollzarr.store import ZARR_METADATA


class VolumeError(ScrollzarrError):
    """A path that cannot be sampled as a scroll volume."""


NO_CACHE = CacheSettings(None, 0)


@dataclass(frozen=True)
class Volume:
    """A 3-D array and where its voxels lie in the scroll.

    Attributes
    ----------
    array : zarr.Array
        Indexed (z, y, x), unsigned integer voxels.
    level : int
        The OME level sampled (0 for a plain array).
    scale : ndarray, shape (3,)
        Size of one voxel of ``array`` in full-resolution voxels (z, y, x).
    translation : ndarray, shape (3,)
        Full-resolution position of voxel (0, 0, 0), (z, y, x).
    """

    array: zarr.Array
    level: int
    scale: np.ndarray
    translation: np.ndarray
    metadata: tuple[tuple[Path, tuple[int, int, int] | None], ...] = field(default=())

    def changed(self) -> str | None:
        """What tells that the array was replaced since it was opened, or ``None``.

        scroll_to_ome ``--overwrite`` (or ``--first_new_level``) writing the store
        while it is read makes chunks vanish, which read as zeros: the array's
        metadata file (its identity: device, inode, modification time) and the
        store's progress record tell.
        """
        for path, identity in self.metadata:
            if _identity(path) != identity:
                return f"{path} was replaced or removed"
            record = _unfinished(path.parent)
            if record is not None:
                return f"{record} appeared: the store is being written"
        return None

    @property
    def shape(self) -> Shape3:
        return shape3(self.array.shape)


def open_volume(path: Path | str, level: int = 0, cache: CacheSettings = NO_CACHE) -> Volume:
    """Open ``path`` (a zarr array, or an OME-Zarr group whose level ``level`` is used): a directory, or the URL of
    one on a web server or in a bucket (see :mod:`scrollzarr.remote`), whose objects ``cache`` keeps on disk.

    Raises
    ------
    VolumeError
        If the path is not a zarr array or OME-Zarr group, the store is an
        unfinished conversion, the level does not exist, or the array is not
        a 3-D array of unsigned integers.
    ScrollzarrError
        If a remote volume cannot be fetched, or its URL holds a login.
    """
    if is_url(path):
        store = open_store(str(path), cache)
        node = _open_node(path, store)
        unfinished = sync(store.exists(progress.KEY))
    else:
        path = Path(path)
        if not path.exists():
            raise VolumeError(f"{path}: no such zarr store")
        node = _open_node(path, str(path))
        unfinished = _unfinished(path.resolve()) is not None
    if unfinished:
        raise VolumeError(
            f"{path} belongs to an unfinished conversion (its store holds {progress.KEY}); "
            "finish it with scroll_to_ome --resume first"
        )
    if isinstance(node, zarr.Array):
        if level != 0:
            raise VolumeError(f"{path} is a plain zarr array with no levels; --level needs an OME-Zarr group")
        return _checked(path, Volume(node, 0, np.ones(3), np.zeros(3)))
    multiscale = _multiscale(path, dict(node.attrs))
    count = len(multiscale.datasets)
    if not 0 <= level < count:
        raise VolumeError(f"{path} has levels 0 to {count - 1}; --level {level} is not one of them")
    dataset = multiscale.datasets[level]
    base_size = np.asarray(multiscale.datasets[0].scale, dtype=np.float64)
    translation = np.zeros(3) if dataset.translation is None else np.asarray(dataset.translation) / base_size
    try:
        array = node[dataset.path]
    except KeyError:
        raise VolumeError(f"{path}: level {level}'s array {dataset.path!r} is missing") from None
    if not isinstance(array, zarr.Array):
        raise VolumeError(f"{path}: level {level}'s path {dataset.path!r} is not an array")
    return _checked(path, Volume(array, level, np.asarray(dataset.scale) / base_size, translation))


def _open_node(path: Path | str, store: StoreLike) -> zarr.Array | zarr.Group:
    try:
        return zarr.open(store=store, mode="r")
    except ScrollzarrError:
        raise
    except Exception as error:  # zarr raises many kinds for a directory that is not a store
        raise VolumeError(
            f"{path} is neither a zarr array nor an OME-Zarr group ({type(error).__name__}: {error}); "
            "give the .zarr made by scroll_to_ome, or one of its levels"
        ) from None


def _multiscale(path: Path | str, attrs: dict[str, Any]) -> Multiscale:
    """The first ``multiscales`` entry of NGFF 0.4 (top level) or 0.5 (under ``ome``) attributes."""
    try:
        return ngff.read(attrs)
    except ngff.MissingMetadata:
        raise VolumeError(
            f"{path} is a zarr group without OME-Zarr 'multiscales' metadata; give an OME-Zarr or a zarr array"
        ) from None
    except ngff.MetadataError as error:
        raise VolumeError(f"{path}: {error}; give an OME-Zarr made by scroll_to_ome, or a zarr array") from None


def _unfinished(where: Path) -> Path | None:
    """The progress record of a conversion in ``where`` or a directory above it, if there is one."""
    return next((folder / progress.KEY for folder in (where, *where.parents) if (folder / progress.KEY).exists()), None)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Device, inode and modification time (ns) of ``path``; ``None`` if it does not exist."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns


def _checked(path: Path | str, volume: Volume) -> Volume:
    array = volume.array
    if array.ndim != 3:
        raise VolumeError(f"{path}: the array has {array.ndim} dimensions; a scroll volume has 3 (z, y, x)")
    if array.dtype.kind != "u":
        raise VolumeError(f"{path}: voxels are {array.dtype}; ppm_to_layers renders unsigned integer volumes")
    if volume.scale.shape != (3,) or volume.translation.shape != (3,) or not np.all(volume.scale > 0):
        raise VolumeError(f"{path}: level {volume.level}'s scale/translation are not three positive numbers")
    store = array.store
    if not isinstance(store, LocalStore):
        return volume
    folder = Path(store.root) / array.path
    files = [folder / name for name in ZARR_METADATA if (folder / name).is_file()]
    return replace(volume, metadata=tuple((file, _identity(file)) for file in files))
