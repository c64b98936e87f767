"""The record a ``ppm_to_layers`` run leaves beside its layer TIFFs, so that ``--overwrite`` removes only its own files.

A layer TIFF's name (``00.tif`` …) says nothing about who wrote it: a segment
folder holds ``20230929220926.tif``, a folder of slices ``00000.tif`` ….  Each
run therefore writes ``OUTPUT_TIFF_DIR/.scrollzarr-layers.json``:

* once its hidden partial files are laid out, adding them (with their sizes) to
  the record, so that a later run can remove them if this one is killed;
* once its TIFFs have their final names, naming them (with each file's size and
  modification time), the layer count, height, width and type.

A run that fails puts the record back as it found it.  A later ``--overwrite``
run removes a recorded file only if it does not write that name again and the
file is still the one recorded.  No record: nothing is removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST_NAME = ".scrollzarr-layers.json"
LAYER_NAME = re.compile(r"^\d+\.tif$")
PARTIAL_NAME = re.compile(r"^\.\d+\.tif\.partial$")

# file name -> (size in bytes, modification time in ns, or None where it is not kept: a partial file's
# changes while it is written)
Recorded = dict[str, tuple[int, int | None]]


@dataclass
class Record:
    """What the record of an output directory lists.

    Attributes
    ----------
    description : dict
        The finished layer set: ``layers`` (names), ``count``, ``height``, ``width``, ``dtype``.
    files : Recorded
        Its layer TIFFs.
    partial : Recorded
        Partial files of runs that started since and may not have finished.
    """

    description: dict[str, Any] = field(default_factory=dict)
    files: Recorded = field(default_factory=dict)
    partial: Recorded = field(default_factory=dict)


def write_finished(directory: Path, names: list[str], height: int, width: int, dtype: np.dtype) -> None:
    """Record the finished layer TIFFs ``names`` of ``directory``, each ``height x width`` of ``dtype``."""
    description = {"layers": names, "count": len(names), "height": height, "width": width, "dtype": str(dtype)}
    write_manifest(directory, Record(description, _current(directory, names, with_time=True)))


def add_partial(directory: Path, previous: Record | None, names: list[str]) -> None:
    """Add the partial files ``names`` (laid out in full, so of their final size) to the record ``previous``."""
    record = previous or Record()
    pending = record.partial | _current(directory, names, with_time=False)
    write_manifest(directory, Record(record.description, record.files, pending))


def restore(directory: Path, previous: Record | None) -> None:
    """Put back the record ``previous`` after a run that failed (``None``: there was none)."""
    if previous is None:
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
    else:
        write_manifest(directory, previous)


def write_manifest(directory: Path, record: Record) -> None:
    """Write ``record``, flushed and renamed into place (the caller flushes the directory where it matters)."""
    content = {
        "written_by": "ppm_to_layers",
        **record.description,
        "files": {name: {"size": size, "mtime_ns": mtime} for name, (size, mtime) in record.files.items()},
        "partial": {name: {"size": size} for name, (size, _) in record.partial.items()},
    }
    final = directory / MANIFEST_NAME
    partial = final.with_name(f"{final.name}.partial")
    with open(partial, "w") as file:
        json.dump(content, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, final)


def read_manifest(directory: Path) -> Record | None:
    """The record an earlier run left in ``directory``: ``None`` if there is none, empty if it cannot be read."""
    path = directory / MANIFEST_NAME
    try:
        content = json.loads(path.read_text())
        description = {key: content[key] for key in ("layers", "count", "height", "width", "dtype") if key in content}
        files = {name: (int(entry["size"]), int(entry["mtime_ns"])) for name, entry in content["files"].items()}
        partial = {name: (int(entry["size"]), None) for name, entry in content.get("partial", {}).items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning(f"{path} cannot be read ({error}); no file of an earlier run is removed")
        return Record()
    return Record(
        description,
        {name: entry for name, entry in files.items() if LAYER_NAME.match(name)},
        {name: entry for name, entry in partial.items() if PARTIAL_NAME.match(name)},
    )


def remove_stale(directory: Path, previous: Record | None, keep: set[str]) -> list[str]:
    """Delete the files ``previous`` lists, but for ``keep``, that are still what was recorded; return their names."""
    if previous is None:
        return []
    removed = []
    for name, (size, mtime_ns) in sorted((previous.files | previous.partial).items()):
        if name in keep:
            continue
        path = directory / name
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            continue
        same = status.st_size == size and mtime_ns in (None, status.st_mtime_ns)
        if stat.S_ISREG(status.st_mode) and same:
            path.unlink()
            removed.append(name)
        else:
            log.warning(f"kept {path}: an earlier run wrote it, but it has changed since")
    return removed


def _current(directory: Path, names: Iterable[str], with_time: bool) -> Recorded:
    """Size (and modification time) of the files ``names`` in ``directory`` now."""
    recorded: Recorded = {}
    for name in names:
        status = os.stat(directory / name)
        recorded[name] = (status.st_size, status.st_mtime_ns if with_time else None)
    return recorded
