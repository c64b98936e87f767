"""The record of a ``ppm_to_layers`` render in progress, so that ``--resume`` continues a stopped one.

``OUTPUT_TIFF_DIR/.scrollzarr-render.json`` names what the render is (its
fingerprint: the surface and its files' sizes and times, the volume, every
option that changes a pixel, the images' shape and type) and the bands whose
rows are on the disk, with what each found.  It is written durably once the
partial TIFFs are laid out, then again at most once a second as bands finish,
each time after the partial TIFFs are flushed, so that every band it lists
survives a kill or a power cut.  A finished render removes it before the
first rename; an interrupted one (Ctrl-C, SIGTERM) leaves it with its partial
files, as a killed one does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scrollzarr.durable import remove_durably, write_durably
from scrollzarr.errors import ScrollzarrError, UsageError

NAME = ".scrollzarr-render.json"


def part_name(name: str, number: int, count: int) -> str:
    """``name`` of part ``number`` of ``count`` of a render (``--num_parts``): ``00.tif`` -> ``00.part3.tif``,
    ``.scrollzarr.lock`` -> ``.scrollzarr.part3.lock``; ``name`` itself for a render in one part."""
    if count <= 1:
        return name
    stem, dot, extension = name.rpartition(".")
    return f"{stem}.part{number}.{extension}" if dot and stem else f"{name}.part{number}"


def record_name(number: int, count: int) -> str:
    """The record of part ``number`` of ``count``: :data:`NAME`, or ``.scrollzarr-render.part3.json``."""
    return part_name(NAME, number, count)


SAVE_SECONDS = 1.0  # at most this often: each save flushes every partial TIFF


@dataclass
class RenderProgress:
    """A render's fingerprint, whether it was started with ``--overwrite``, and its bands on the disk.

    Attributes
    ----------
    directory : Path
        OUTPUT_TIFF_DIR, where the record lives (as ``name``: a part of a render has its own).
    fingerprint : dict
        What the render is (JSON values).
    overwrite : bool
        The render replaces files of earlier runs (they are removed at its end, as ``--overwrite`` says).
    done : dict
        Band number -> (pixels mapped, pixels with non-finite coordinates) of every band on the disk.
    """

    directory: Path
    fingerprint: dict[str, Any]
    overwrite: bool
    done: dict[int, tuple[int, int]] = field(default_factory=dict)
    name: str = NAME
    saved: float = field(default=0.0, compare=False)

    def save(self, done: dict[int, tuple[int, int]] | None = None) -> None:
        """Write the record durably, listing the bands ``done`` (by default :attr:`done`; the caller has flushed
        the rows of every band listed)."""
        listed = self.done if done is None else done
        content = {
            "written_by": "ppm_to_layers",
            "fingerprint": self.fingerprint,
            "overwrite": self.overwrite,
            "done": {str(number): list(counts) for number, counts in sorted(listed.items())},
        }
        write_durably(self.directory / self.name, json.dumps(content, indent=1).encode())
        self.saved = time.monotonic()

    def due(self) -> bool:
        """Whether a second has passed since the last save."""
        return time.monotonic() - self.saved >= SAVE_SECONDS

    def remove(self) -> None:
        remove_durably(self.directory / self.name)


def exists(directory: Path, name: str = NAME) -> bool:
    return (directory / name).is_file()


def resume(directory: Path, fingerprint: dict[str, Any], name: str = NAME) -> RenderProgress:
    """The stopped render of ``directory`` whose fingerprint is ``fingerprint``.

    Raises
    ------
    UsageError
        If there is no stopped render there.
    ScrollzarrError
        If its record cannot be read, or it was a render of something else (the first difference named).
    """
    path = directory / name
    try:
        content = json.loads(path.read_text())
        recorded = content["fingerprint"]
        done = {int(number): (int(counts[0]), int(counts[1])) for number, counts in content["done"].items()}
        overwrite = bool(content["overwrite"])
    except FileNotFoundError:
        parts = sorted(path.name for path in directory.glob(NAME.replace(".json", ".part*.json")))
        hint = f" (it holds stopped parts of one: {parts[0]} ...; give --num_parts and --part_id)" if parts else ""
        raise UsageError(
            f"--resume: {directory} holds no stopped render (no {name}){hint}; render without --resume"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ScrollzarrError(
            f"--resume: the record {path} cannot be read ({error}); render again with --overwrite"
        ) from None
    for key in sorted(recorded.keys() | fingerprint.keys()):
        if recorded.get(key) != fingerprint.get(key):
            raise ScrollzarrError(
                f"--resume: the render stopped in {directory} had {key} {_shown(recorded.get(key))}, this one "
                f"{_shown(fingerprint.get(key))}; give the stopped render's arguments (and inputs) to continue it, "
                "or render again with --overwrite"
            )
    return RenderProgress(directory, fingerprint, overwrite, done, name)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
