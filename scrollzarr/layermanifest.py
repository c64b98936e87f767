"""The record a ``ppm_to_layers`` run leaves beside its layer TIFFs, so that ``--overwrite`` removes only its own files.

A layer TIFF's name (``00.tif`` …) says nothing about who wrote it: a segment
folder holds ``20230929220926.tif``, a folder of slices ``00000.tif`` ….  Each
run therefore writes ``OUTPUT_TIFF_DIR/.scrollzarr-layers.json`` naming the
layer files it wrote, with each file's size and modification time; a later
``--overwrite`` run removes a file only if that record lists it, this run does
not write it again, and it is still the file recorded (same size and time).
No record: nothing is removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MANIFEST_NAME = ".scrollzarr-layers.json"
LAYER_NAME = re.compile(r"^\d+\.tif$")

Recorded = dict[str, tuple[int, int]]  # layer file name -> (size in bytes, modification time in ns)


def manifest_path(directory: Path) -> Path:
    return directory / MANIFEST_NAME


def write_manifest(directory: Path, names: Sequence[str], height: int, width: int, dtype: np.dtype) -> None:
    """Record the layer files ``names`` (already in ``directory``, each ``height x width`` of ``dtype``).

    The record is flushed and renamed into place; the caller flushes the
    directory (with the renames of the TIFFs).
    """
    files = {}
    for name in names:
        status = os.stat(directory / name)
        files[name] = {"size": status.st_size, "mtime_ns": status.st_mtime_ns}
    record = {
        "written_by": "ppm_to_layers",
        "layers": list(names),
        "count": len(names),
        "height": height,
        "width": width,
        "dtype": str(np.dtype(dtype)),
        "files": files,
    }
    final = manifest_path(directory)
    partial = final.with_name(f"{final.name}.partial")
    with open(partial, "w") as file:
        json.dump(record, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, final)


def read_manifest(directory: Path) -> Recorded:
    """The layer files an earlier run recorded in ``directory`` (none if it left no readable record)."""
    path = manifest_path(directory)
    try:
        files = json.loads(path.read_text())["files"]
        recorded = {name: (int(entry["size"]), int(entry["mtime_ns"])) for name, entry in files.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning(f"{path} cannot be read ({error}); no layer file of an earlier run is removed")
        return {}
    return {name: entry for name, entry in recorded.items() if LAYER_NAME.match(name)}


def remove_stale(directory: Path, recorded: Recorded, keep: set[str]) -> list[str]:
    """Delete the recorded layer files not in ``keep`` that are still what was recorded; return their names."""
    removed = []
    for name, (size, mtime_ns) in sorted(recorded.items()):
        if name in keep:
            continue
        path = directory / name
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(status.st_mode) and (status.st_size, status.st_mtime_ns) == (size, mtime_ns):
            path.unlink()
            removed.append(name)
        else:
            log.warning(f"kept {path}: an earlier run wrote it, but it has changed since")
    return removed
