"""OME-NGFF 0.5 metadata (zarr format 3 stores): only what differs from 0.4.

A 0.5 ``multiscales`` entry is a 0.4 entry (:class:`~scrollzarr.ngff_v04.Multiscale`:
axes, datasets with scale and translation, type, metadata) without a ``version``
key of its own: the version moves to the group attribute ``ome``, which holds
``{"version": "0.5", "multiscales": [...]}``.  The spec (and ome-zarr-models'
``v05`` validator) also asks every level array for zarr 3 ``dimension_names``
equal to the axes' names, ``("z", "y", "x")``: that is the arrays' business
(:meth:`scrollzarr.layout.StoreLayout.create_array`), not the group's.
"""

from __future__ import annotations

from typing import Any

from scrollzarr.ngff_v04 import Multiscale

VERSION = "0.5"
KEY = "ome"


def attributes(multiscale: Multiscale, ome: dict[str, Any] | None = None) -> dict[str, Any]:
    """The group attributes that hold ``multiscale``.

    Parameters
    ----------
    ome : dict or None
        The group's ``ome`` attribute as it is; its keys other than ``version``
        and ``multiscales`` are kept.
    """
    entry = {key: value for key, value in multiscale.to_json().items() if key != "version"}
    return {KEY: {**(ome or {}), "version": VERSION, "multiscales": [entry]}}


def entries(attrs: dict[str, Any]) -> Any:
    """The ``ome`` → ``multiscales`` value of group attributes (unchecked), or ``None`` if there is none."""
    ome = attrs.get(KEY)
    return ome.get("multiscales") if isinstance(ome, dict) else None


def without(attrs: dict[str, Any]) -> dict[str, Any]:
    """The group attributes without ``ome`` → ``multiscales``.

    The rest of ``ome`` stays; an ``ome`` left with nothing but its ``version``
    goes too, since it would then describe nothing.
    """
    rest = {key: value for key, value in attrs.items() if key != KEY}
    ome = {key: value for key, value in attrs.get(KEY, {}).items() if key != "multiscales"}
    return rest if set(ome) <= {"version"} else {**rest, KEY: ome}
