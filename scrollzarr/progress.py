"""The progress record: what a conversion has finished, kept inside the store it writes.

Its presence marks the store as unfinished; it is written after each unit of
work is on disk, and removed once the metadata is complete.  Each save first
flushes the store's file system, so that what the record vouches for survives
a power cut, then replaces the record durably.  ``--resume`` reads it to continue where the run stopped and to
check that the options are those of the run it continues.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scrollzarr.errors import ScrollzarrError
from scrollzarr.storage import Location, storage

KEY = "scrollzarr_progress.json"
# The input's slice files of the run, written once when it starts: the record, saved after every slab, holds
# only their digest (measured: a 14,376-slice list in the record made each save 80 ms and 1 MB).
SLICES_KEY = "scrollzarr_slices.json"
# A run of tasks keeps the rest of its record here: each task's marker, and the run's fence (scrollzarr.tasks).
MARKERS = "scrollzarr_tasks"
_NAMED = 5

# Options whose change makes a stopped conversion impossible to continue, with their command-line names.
# (The fingerprint also holds "slices", the digest of the input's slice files, which input_change checks.)
FINGERPRINT_OPTIONS = {
    "input_directory": "the input directory",
    "chunk_size": "--chunk_size",
    "nlevels": "--nlevels",
    "region_zyx": "--ranges",
    "algorithm": "--algorithm",
    "obytes": "--obytes",
    "zarr_only": "--zarr_only",
    "bad_slices": "--bad_slices",
    "zarr_format": "--zarr_format",
    "shard_shape": "--shard_shape",
    "compressor": "--compressor",
    "clevel": "--clevel",
    "window": "--window",
}
# What a record written before an option existed means by its absence (scrollzarr 0.1 had no layout options):
# a run stopped by an older version is resumed by a newer one.
ADDED_LATER = {"zarr_format": 2, "shard_shape": None, "compressor": "none", "clevel": 0, "window": None}


@dataclass
class Progress:
    """What is finished.

    Attributes
    ----------
    fingerprint : dict
        The options of the run (keys of :data:`FINGERPRINT_OPTIONS`).
    bands : list of int
        Level-0 band layout: rows, columns, levels streamed.
    bands_done : int
        Bands converted completely, in order.
    slabs_done : int
        Level-0 slabs (chunk rows of slices) of the current band that are on disk.
    streams : list of list of int
        :meth:`LevelStream.state` of each streamed level after ``slabs_done`` slabs.
    rows_done : dict of str to int
        For each level built from the level above: its chunk rows in z on disk.
    chunks_written : dict of str to int
        Chunk files written per level, for the summary.
    bad_slices : list of int
        Slices that could not be read and were written as zeros.
    bad_rows : dict of str to int
        For each bad slice, the first of its rows written as zeros (scan rows);
        the rows above it are converted as they are.
    tasks : bool
        Whether the run is cut into tasks (``--scheduler``): what is finished is
        then marked by each task in the store (:mod:`scrollzarr.tasks`), and the
        counts above are not kept.
    run : str
        For a run of tasks, its identity: the name of its marker directory in the store.
    blocks : list of list of int
        For a run of tasks, the blocks (z, y, x) of the levels built from the level
        above: a resumed run cuts them the same way, so that the tasks marked
        finished are its tasks (the blocks depend on the threads a task has).
    """

    fingerprint: dict[str, Any]
    bands: list[int]
    bands_done: int = 0
    slabs_done: int = 0
    streams: list[list[int]] = field(default_factory=list)
    rows_done: dict[str, int] = field(default_factory=dict)
    chunks_written: dict[str, int] = field(default_factory=dict)
    bad_slices: list[int] = field(default_factory=list)
    bad_rows: dict[str, int] = field(default_factory=dict)
    tasks: bool = False
    run: str = ""
    blocks: list[list[int]] = field(default_factory=list)

    def save(self, output: Location) -> None:
        """Write the record into the store at ``output``, once everything written before it is on the disk.

        One ``syncfs`` of the store's file system makes every chunk and metadata
        file written so far durable, names included; then the record is replaced
        durably (temporary file, flush, rename, flush of the directory).  So after
        a power cut the record never vouches for data that is not on the disk.
        In a bucket the record is one object, put whole after the objects it vouches for.
        """
        store = storage(output)
        store.sync()
        store.put(KEY, json.dumps(asdict(self), indent=1).encode())

    def forget(self, output: Location, damaged: list[Path]) -> None:
        """Save this record, wound back by the caller to before the units that wrote ``damaged``, then delete them.

        The record goes first: a stop in between still finds the damaged files
        (and deletes them again), never zeros where the record vouches for data.
        """
        if damaged:
            self.save(output)
            for path in damaged:
                path.unlink()

    def mismatch(self, fingerprint: dict[str, Any], options: dict[str, str] = FINGERPRINT_OPTIONS) -> str | None:
        """The first of ``options`` (fingerprint key: its name) that differs from the recorded run, as a sentence;
        ``None`` if all agree."""
        for key, name in options.items():
            recorded = self.fingerprint.get(key, ADDED_LATER.get(key))
            if recorded != fingerprint.get(key):
                return f"{name} was {recorded!r} in the stopped run, now {fingerprint.get(key)!r}"
        return None


def load(output: Location) -> Progress | None:
    """The record in the store at ``output``, or ``None`` if it has none.

    Raises
    ------
    ScrollzarrError
        If the record exists but cannot be read.
    """
    try:
        raw = storage(output).get(KEY)
    except FileNotFoundError:
        return None
    try:
        return Progress(**json.loads(raw))
    except (ValueError, TypeError) as error:
        raise ScrollzarrError(
            f"the progress record {KEY} in the output is damaged ({error}); start again with --overwrite"
        ) from None


def remove(output: Location) -> None:
    """Delete the list of slice files, then the record, once the metadata that finishes the store is on the disk.

    In that order: a stop between them leaves a resumable store (the list only names changed files).
    """
    store = storage(output)
    store.sync()
    store.delete(SLICES_KEY)
    store.delete(KEY)


def exists(output: Location) -> bool:
    """Whether the store at ``output`` holds a progress record."""
    return storage(output).exists(KEY)


SliceFiles = list[tuple[str, int, int]]


def slices_digest(slices: SliceFiles) -> str:
    """A digest of the input's slice files (name, size in bytes, modification time in ns), for the fingerprint."""
    return hashlib.sha256(json.dumps(slices, separators=(",", ":")).encode()).hexdigest()


def save_slices(output: Location, slices: SliceFiles) -> None:
    """Keep the input's slice files in the store at ``output``, to name what changed if a resumed run finds
    another input (written durably, like the record)."""
    storage(output).put(SLICES_KEY, json.dumps(slices, separators=(",", ":")).encode())


def input_change(record: Progress, slices: SliceFiles, output: Location) -> str | None:
    """How the input's slice files differ from the stopped run's, as text; ``None`` if they do not.

    Files are told apart by name; a file of the same name whose size or
    modification time differs has changed.
    """
    if "slices" not in record.fingerprint or record.fingerprint["slices"] == slices_digest(slices):
        return None
    try:
        raw = storage(output).get(SLICES_KEY)
    except FileNotFoundError:
        return "its list of slice files is missing from the output, so the changed files cannot be named"
    before = {name: (size, mtime) for name, size, mtime in json.loads(raw)}
    now = {name: (size, mtime) for name, size, mtime in slices}
    kinds = {
        "added": [name for name in now if name not in before],
        "removed": [name for name in before if name not in now],
        "changed": [name for name in now if name in before and now[name] != before[name]],
    }
    return ", ".join(f"{len(names)} {kind} ({_named(names)})" for kind, names in kinds.items() if names)


def _named(names: list[str]) -> str:
    more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return ", ".join(sorted(names)[:_NAMED]) + more
