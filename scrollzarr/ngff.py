"""OME-NGFF ``multiscales`` metadata in a group's attributes, whichever the version: the one place that
writes, reads and removes it.

Zarr format 2 stores carry OME-NGFF 0.4 (:mod:`scrollzarr.ngff_v04`: a top-level
``multiscales``), zarr format 3 stores 0.5 (:mod:`scrollzarr.ngff_v05`: ``ome`` →
``multiscales``).  Reading tells the two apart by where the entries are.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from scrollzarr import ngff_v04, ngff_v05
from scrollzarr.errors import ScrollzarrError
from scrollzarr.ngff_v04 import AXES, Multiscale


class MetadataError(ScrollzarrError):
    """Group attributes whose ``multiscales`` metadata cannot be used; the message says what is wrong
    (a phrase, for the caller to put after the store's name)."""


class MissingMetadata(MetadataError):
    """Group attributes with no ``multiscales`` metadata at all."""


def attributes(multiscale: Multiscale, zarr_format: int, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The group attributes to add (``attrs.update``) that hold ``multiscale`` in the version of ``zarr_format``.

    Parameters
    ----------
    zarr_format : {2, 3}
        2: OME-NGFF 0.4, 3: OME-NGFF 0.5.
    existing : dict or None
        The group's attributes as they are: for 0.5, the rest of their ``ome`` is kept.
    """
    if zarr_format == 2:
        return ngff_v04.attributes(multiscale)
    if zarr_format == 3:
        ome = (existing or {}).get(ngff_v05.KEY)
        return ngff_v05.attributes(multiscale, ome if isinstance(ome, dict) else None)
    raise ValueError(f"no OME-NGFF version for zarr format {zarr_format}")


def version(attrs: dict[str, Any]) -> str | None:
    """The OME-NGFF version whose ``multiscales`` ``attrs`` hold (``"0.4"`` or ``"0.5"``), or ``None``."""
    module = _module(attrs)
    return None if module is None else module.VERSION


def without(attrs: dict[str, Any]) -> dict[str, Any]:
    """``attrs`` with their ``multiscales`` removed (what ``--first_new_level`` does before it rebuilds).

    Everything else stays; attributes without ``multiscales`` come back equal.
    """
    module = _module(attrs)
    return dict(attrs) if module is None else module.without(attrs)


def removed(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes that :func:`without` removes or changes, with their values: ``{**without(attrs),
    **removed(attrs)} == attrs``, and :func:`read` reads them as it reads ``attrs``."""
    kept = without(attrs)
    return {key: value for key, value in attrs.items() if key not in kept or kept[key] != value}


def read(attrs: dict[str, Any]) -> Multiscale:
    """The first ``multiscales`` entry of OME-NGFF 0.4 or 0.5 group attributes.

    Raises
    ------
    MissingMetadata
        If ``attrs`` hold no ``multiscales`` of either version.
    MetadataError
        If the first entry is malformed, or describes what :class:`~scrollzarr.ngff_v04.Multiscale`
        cannot: axes other than z, y, x, transformations of every level, a level without a scale of
        three positive numbers or with a translation other than three numbers.
    """
    module = _module(attrs)
    if module is None:
        raise MissingMetadata(
            "no OME-Zarr 'multiscales' metadata (neither OME-NGFF 0.4's 'multiscales' nor 0.5's 'ome' → 'multiscales')"
        )
    entries = module.entries(attrs)
    where = f"OME-NGFF {module.VERSION} 'multiscales'"
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise MetadataError(f"{where} is not a list of entries")
    entry = entries[0]
    axes = entry.get("axes", AXES)
    names = [axis.get("name") if isinstance(axis, dict) else axis for axis in axes] if isinstance(axes, list) else axes
    if not isinstance(names, list | tuple) or tuple(names) != AXES:
        raise MetadataError(f"{where} has axes {names}, not z, y, x")
    if entry.get("coordinateTransformations"):
        raise MetadataError(f"{where} has transformations that apply to every level, which are not supported")
    if not isinstance(entry.get("datasets"), list) or not entry["datasets"]:
        raise MetadataError(f"{where} has no list of 'datasets' (levels)")
    try:
        multiscale = Multiscale.from_json(entry)
    except KeyError as error:
        raise MetadataError(f"{where} lacks the key {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise MetadataError(f"{where} is malformed ({type(error).__name__}: {error})") from None
    for dataset in multiscale.datasets:
        if dataset.scale is None or len(dataset.scale) != 3 or not all(0 < v < math.inf for v in dataset.scale):
            raise MetadataError(f"{where} gives level {dataset.path!r} no 'scale' of three positive numbers")
        if dataset.translation is not None and (
            len(dataset.translation) != 3 or not all(math.isfinite(v) for v in dataset.translation)
        ):
            raise MetadataError(f"{where} gives level {dataset.path!r} a 'translation' other than three numbers")
    return multiscale


def _module(attrs: dict[str, Any]) -> ModuleType | None:
    """The version module whose ``multiscales`` ``attrs`` hold (0.5 first: a 0.5 group has no top-level one)."""
    if not isinstance(attrs, dict):
        return None
    return next((module for module in (ngff_v05, ngff_v04) if module.entries(attrs) is not None), None)
