"""The record a ``ppm_to_layers`` run leaves beside its layer TIFFs, so that ``--overwrite`` removes only its own files.

A layer TIFF's name (``00.tif`` …) says nothing about who wrote it: a segment
folder holds ``20230929220926.tif``, a folder of slices ``00000.tif`` ….  Each
run therefore writes ``OUTPUT_TIFF_DIR/.scrollzarr-layers.json``:

* before it creates its hidden partial files, adding their names to the record,
  and once they are laid out in full, their sizes, so that a later run can
  remove them if this one is killed;
* once every TIFF is flushed, before the first gets its final name, adding the
  final names (with the sizes they are about to have), so that a run stopped
  during the renames or after them leaves a record of every file it wrote;
* once its TIFFs have their final names, naming them alone (with each file's
  size and modification time), the layer count, height, width and type.

Every version of the record is written durably (:func:`scrollzarr.durable.write_durably`,
directory flushed), so that after a power cut it lists every file that survived.
A run that fails before the renames puts the record back as it found it.  A
later ``--overwrite`` run removes a recorded file only if it does not write
that name again and the file is still the one recorded (either entry, where a
name is both finished and pending).  No record: nothing is removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scrollzarr.durable import remove_durably, write_durably

log = logging.getLogger(__name__)

MANIFEST_NAME = ".scrollzarr-layers.json"
LAYER_NAME = re.compile(r"^\d+(\.part\d+)?\.tif$")  # 00.tif, and a part's 00.part3.tif (--num_parts)
PARTIAL_NAME = re.compile(r"^\.\d+(\.part\d+)?\.tif\.partial$")

# file name -> (size in bytes, or None for a file about to be created, of a size not yet known; modification
# time in ns, or None where it is not kept: a file still being written or renamed changes it)
Recorded = dict[str, tuple[int | None, int | None]]


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
        Files of runs that started since and may not have finished: their partial files, and the final
        names they were renaming them to (sizes only).
    """

    description: dict[str, Any] = field(default_factory=dict)
    files: Recorded = field(default_factory=dict)
    partial: Recorded = field(default_factory=dict)


def write_finished(
    directory: Path,
    names: list[str],
    height: int,
    width: int,
    dtype: np.dtype,
    name: str = MANIFEST_NAME,
    fingerprint: dict[str, Any] | None = None,
) -> None:
    """Record the finished layer TIFFs ``names`` of ``directory``, each ``height x width`` of ``dtype``, and what
    rendered them (a part's ``fingerprint``, which ``--merge_parts`` checks)."""
    description = {"layers": names, "count": len(names), "height": height, "width": width, "dtype": str(dtype)}
    if fingerprint is not None:
        description["fingerprint"] = fingerprint
    write_manifest(directory, Record(description, _current(directory, names)), name)


def add_pending(
    directory: Path, previous: Record | None, names: Mapping[str, str | None], name: str = MANIFEST_NAME
) -> Record:
    """Add to the record ``previous`` the files ``names`` (keys), each of the size its file (value) has now.

    A value of ``None`` records a file about to be created, of any size: a run
    records its partial files before it creates them (so that a power cut
    cannot leave one unrecorded), then again with their sizes once they are
    laid out in full.  A final name is given the partial file about to be
    renamed to it.  Returns the record written.
    """
    record = previous or Record()
    now = {
        file: (None if source is None else os.stat(directory / source).st_size, None) for file, source in names.items()
    }
    updated = Record(record.description, record.files, record.partial | now)
    write_manifest(directory, updated, name)
    return updated


def restore(directory: Path, previous: Record | None, name: str = MANIFEST_NAME) -> None:
    """Put back the record ``previous`` after a run that failed (``None``: there was none)."""
    if previous is None:
        remove_durably(directory / name)
    else:
        write_manifest(directory, previous, name)


def write_manifest(directory: Path, record: Record, name: str = MANIFEST_NAME) -> None:
    """Write ``record`` durably: whole or not at all, and the directory flushed, after a power cut."""
    content = {
        "written_by": "ppm_to_layers",
        **record.description,
        "files": {name: {"size": size, "mtime_ns": mtime} for name, (size, mtime) in record.files.items()},
        "partial": {name: {"size": size} for name, (size, _) in record.partial.items()},
    }
    write_durably(directory / name, json.dumps(content, indent=1).encode())


def remove_leftovers(directory: Path, records: Iterable[str]) -> int:
    """Delete the temporary files that runs stopped while writing the named records left; return how many.

    Only the records of the run's own lock: the parts of a render run at once in one directory, and a part's
    record being written this moment is not another part's leftover (measured: a part failed on its vanished
    ``.scrollzarr-layers.part0.json.<hex>.partial`` when this removed every record's).
    """
    pattern = re.compile("|".join(rf"^{re.escape(name)}\.[0-9a-f]{{32}}\.partial$" for name in records))
    leftovers = [path for path in directory.iterdir() if pattern.match(path.name)]
    for path in leftovers:
        path.unlink()
    return len(leftovers)


def read_manifest(directory: Path, name: str = MANIFEST_NAME) -> Record | None:
    """The record an earlier run left in ``directory``: ``None`` if there is none, empty if it cannot be read."""
    path = directory / name
    try:
        content = json.loads(path.read_text())
        keys = ("layers", "count", "height", "width", "dtype", "fingerprint")
        description = {key: content[key] for key in keys if key in content}
        files = {name: (int(entry["size"]), int(entry["mtime_ns"])) for name, entry in content["files"].items()}
        partial = {name: (_size(entry["size"]), None) for name, entry in content.get("partial", {}).items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning(f"{path} cannot be read ({error}); no file of an earlier run is removed")
        return Record()
    return Record(
        description,
        {name: entry for name, entry in files.items() if LAYER_NAME.match(name)},
        {name: entry for name, entry in partial.items() if PARTIAL_NAME.match(name) or LAYER_NAME.match(name)},
    )


def remove_stale(directory: Path, previous: Record | None, keep: set[str]) -> list[str]:
    """Delete the files ``previous`` lists, but for ``keep``, that are still what was recorded; return their names."""
    if previous is None:
        return []
    removed = []
    for name in sorted(previous.files.keys() | previous.partial.keys()):
        if name in keep:
            continue
        path = directory / name
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            continue
        entries = [entry for entry in (previous.files.get(name), previous.partial.get(name)) if entry is not None]
        same = any(
            size in (None, status.st_size) and mtime_ns in (None, status.st_mtime_ns) for size, mtime_ns in entries
        )
        if stat.S_ISREG(status.st_mode) and same:
            path.unlink()
            removed.append(name)
        else:
            log.warning(f"kept {path}: an earlier run wrote it, but it has changed since")
    return removed


def _size(value: Any) -> int | None:
    """A recorded size: a number of bytes, or ``None`` (null) for a file whose size was not yet known."""
    return None if value is None else int(value)


def _current(directory: Path, names: Iterable[str]) -> Recorded:
    """Size and modification time of the files ``names`` in ``directory`` now."""
    recorded: Recorded = {}
    for name in names:
        status = os.stat(directory / name)
        recorded[name] = (status.st_size, status.st_mtime_ns)
    return recorded
