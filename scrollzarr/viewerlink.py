"""Neuroglancer links for the stores scroll_serve serves: which stores a folder holds, and a link that opens each.

A link is the Neuroglancer app's address with its state in the fragment
(``#!`` and the JSON, URL-encoded, as Neuroglancer writes it itself): one image
layer whose source is the store over HTTP, ``zarr2://`` for a zarr 2 store
(OME-NGFF 0.4, ``.zattrs``) and ``zarr3://`` for zarr 3 (0.5, ``zarr.json``),
which Neuroglancer needs to be told; and the contrast of its default shader
(the ``normalized`` control's range).  Neuroglancer's default range is the whole
of the data type (0 to 65535 for uint16), in which a scan that uses a few
thousand grey values looks black; the range here is the store's own
(``omero.channels[0].window``) where it says one, else the 0.5 and 99.5
percentiles of the non-zero voxels of a sample of its lowest-resolution level
(the background of a masked scan is 0 and would drag the low end down).
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import StoreLike

log = logging.getLogger(__name__)

DEFAULT_APP = "https://neuroglancer-demo.appspot.com/"
DEPTH = 4  # folders below the served one searched for stores
SAMPLE_EDGE = 256  # voxels: the edge of the box of the lowest level read for the contrast (at most 32 MiB of uint16)
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class StoreFound:
    """A store under the served folder.

    Attributes
    ----------
    path : str
        Its path below the served folder, ``/``-separated (``""``: the folder itself).
    zarr_format : int
        2 or 3.
    contrast : tuple of float
        The shader's range, (low, high) in the data's values.
    dtype : str
        The data type of its arrays (numpy's name).
    """

    path: str
    zarr_format: int
    contrast: tuple[float, float]
    dtype: str


def find_stores(root: Path) -> list[StoreFound]:
    """The OME-Zarr stores and plain zarr arrays at or below ``root`` (not inside one another), sorted by path."""
    found: list[StoreFound] = []
    _search(root, root, DEPTH, found)
    return sorted(found, key=lambda store: store.path)


def _search(root: Path, folder: Path, depth: int, found: list[StoreFound]) -> None:
    try:
        kind = _kind(folder)
    except OSError as error:  # a folder this user may not read: the server refuses it too
        log.warning("%s: not searched for stores (%s)", folder, error.strerror or error)
        return
    if kind is not None:
        store = _describe(root, folder, kind)
        if store is not None:
            found.append(store)
        if store is not None or _claims_image(folder):
            return  # a damaged image is told, not searched for the arrays of its levels
    if depth == 0:
        return
    try:
        children = sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    except OSError as error:  # a folder the server cannot read either: nothing to show in it
        log.warning("%s: not searched for stores (%s)", folder, error.strerror or error)
        return
    real_root = root.resolve()
    for child in children:
        try:
            outside = child.is_symlink() and not child.resolve().is_relative_to(real_root)
        except (OSError, RuntimeError):  # a symlink loop
            continue
        if outside:
            continue  # the server refuses what lies outside the served folder: not searched either
        _search(root, child, depth - 1, found)


def _claims_image(folder: Path) -> bool:
    """Whether ``folder``'s metadata says it is an array or an OME-Zarr image (whether zarr can open it or not)."""
    if (folder / ".zarray").is_file():
        return True
    for name in (".zattrs", "zarr.json"):
        try:
            metadata = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(metadata, dict):
            continue
        if metadata.get("node_type") == "array":
            return True
        attributes = metadata.get("attributes", metadata) if name == "zarr.json" else metadata
        if isinstance(attributes, dict) and _multiscales(attributes):
            return True
    return False


def _kind(folder: Path) -> int | None:
    """2 or 3 for a folder holding zarr metadata, else ``None``."""
    if (folder / ".zattrs").is_file() or (folder / ".zarray").is_file():
        return 2
    if (folder / "zarr.json").is_file():
        return 3
    return None


def _describe(root: Path, folder: Path, zarr_format: int) -> StoreFound | None:
    """The store at ``folder``, or ``None`` for a zarr group that is not an image (searched further in)."""
    path = folder.relative_to(root).as_posix()
    return describe(folder, "" if path == "." else path, zarr_format)


def describe(store: StoreLike, path: str, zarr_format: int | None = None, sample: bool = True) -> StoreFound | None:
    """The image stored in ``store`` (a folder, or a zarr store such as a remote one), shown at ``path``; ``None``
    for a zarr group that is not an image, or metadata zarr cannot read (then logged).  Without ``sample``, the
    contrast is the store's window, else the data type's range."""
    try:
        node = zarr.open(store, mode="r", zarr_format=zarr_format)  # type: ignore[arg-type]
    except Exception as error:  # any damage zarr finds: told, and the server goes on with the other stores
        log.warning("%s: not shown, its zarr metadata cannot be read (%s)", store, error)
        return None
    attributes: dict[str, Any] = {}
    lowest = node
    if isinstance(node, zarr.Group):
        attributes = dict(node.attrs)
        multiscales = _multiscales(attributes)
        if not multiscales:
            return None
        try:
            lowest = node[multiscales[0]["datasets"][-1]["path"]]
        except Exception as error:  # a missing array, and any damage of its metadata zarr finds
            log.warning("%s: not shown, its lowest level cannot be opened (%s)", store, error)
            return None
    if not isinstance(lowest, zarr.Array):
        return None
    return StoreFound(path, lowest.metadata.zarr_format, contrast(lowest, attributes, sample), str(lowest.dtype))


def _multiscales(attributes: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``multiscales`` of OME-NGFF 0.4 (top level) or 0.5 (under ``ome``)."""
    ome = attributes.get("ome")
    value = ome.get("multiscales") if isinstance(ome, dict) else attributes.get("multiscales")
    return value if isinstance(value, list) else []


def contrast(lowest: zarr.Array, attributes: dict[str, Any], sample: bool = True) -> tuple[float, float]:
    """The shader's range for a store: its ``omero`` window, else percentiles of a sample of ``lowest`` (without
    ``sample``: the data type's range)."""
    ome = attributes.get("ome")
    omero = (ome if isinstance(ome, dict) else attributes).get("omero")
    try:
        window = omero["channels"][0]["window"]  # type: ignore[index]
        low, high = float(window["start"]), float(window["end"])
        if math.isfinite(low) and math.isfinite(high) and low < high:
            return low, high
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    if not sample:
        return contrast_of(np.zeros(0, lowest.dtype))
    starts = [max(0, (n - SAMPLE_EDGE) // 2) for n in lowest.shape]  # the middle: a scroll's edges are background
    try:
        voxels = np.asarray(lowest[tuple(slice(start, start + SAMPLE_EDGE) for start in starts)])
    except Exception as error:  # a damaged or missing chunk: the data type's whole range
        log.warning("%s: the contrast is the data type's whole range, a sample could not be read (%s)", lowest, error)
        voxels = np.zeros(0, lowest.dtype)
    return contrast_of(voxels)


def contrast_of(sample: np.ndarray) -> tuple[float, float]:
    """The (low, high) percentiles :data:`PERCENTILES` of the non-zero values of ``sample``; the data type's whole
    range where the two are equal (no non-zero value, or nearly all of one value)."""
    values = sample[sample != 0]
    if values.size:
        low, high = (float(v) for v in np.percentile(values, PERCENTILES))
        if low < high:
            return (math.floor(low), math.ceil(high)) if sample.dtype.kind in "iu" else (low, high)
    if sample.dtype.kind in "iu":
        info = np.iinfo(sample.dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def neuroglancer_url(app: str, base: str, store: StoreFound, name: str) -> str:
    """The link that opens ``store`` (served at ``base``, an http:// address) in the Neuroglancer ``app``."""
    # Encoded as a URL's path (a store named "h#x.zarr" is /h%23x.zarr/): Neuroglancer reads the source as a URL
    path = urllib.parse.quote(store.path, safe="/")
    location = f"{base.rstrip('/')}/{path}/" if path else f"{base.rstrip('/')}/"
    layer = {
        "type": "image",
        "source": f"zarr{store.zarr_format}://{location}",
        "name": name,
        "shaderControls": {"normalized": {"range": [_number(store.contrast[0]), _number(store.contrast[1])]}},
    }
    state = {"layers": [layer], "layout": "4panel"}
    fragment = urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="~@$&()*!+=:;,.?/'")
    return f"{app}#!{fragment}"


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
