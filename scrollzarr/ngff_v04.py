"""OME-NGFF 0.4 ``multiscales`` metadata as dataclasses (zarr format 2 stores).

Only what this project writes: three spatial axes z, y, x in voxel units, one
dataset per level with a power-of-two scale and, for a cropped volume, a
translation to the crop's position in the full scan.  khartes reads
``datasets`` in order and insists on scales of three equal values 1, 2, 4, …,
so no physical unit is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERSION = "0.4"
AXES = ("z", "y", "x")


@dataclass(frozen=True)
class Dataset:
    """One resolution level.

    Attributes
    ----------
    path : str
        The level's array, relative to the group (``"0"``, ``"1"``, …).
    scale : tuple of float
        Size of one voxel of this level in full-resolution voxels, (z, y, x).
    translation : tuple of float or None
        Position of voxel (0, 0, 0) in full-resolution scan voxels, (z, y, x).
    """

    path: str
    scale: tuple[float, float, float]
    translation: tuple[float, float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": list(self.scale)}]
        if self.translation is not None:
            transforms.append({"type": "translation", "translation": list(self.translation)})
        return {"path": self.path, "coordinateTransformations": transforms}


@dataclass(frozen=True)
class Multiscale:
    """A ``multiscales`` entry: the levels of one image, full resolution first."""

    name: str
    datasets: tuple[Dataset, ...]
    downsampling: str
    downsampling_parameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "name": self.name,
            "axes": [{"name": axis, "type": "space"} for axis in AXES],
            "datasets": [dataset.to_json() for dataset in self.datasets],
            "type": self.downsampling,
            "metadata": {"method": "scrollzarr", **self.downsampling_parameters},
        }

    @classmethod
    def pyramid(
        cls,
        name: str,
        nlevels: int,
        origin: tuple[int, int, int] | None,
        downsampling: str,
        downsampling_parameters: dict[str, Any] | None = None,
    ) -> Multiscale:
        """Levels ``0 … nlevels-1``, each half the previous along every axis.

        Parameters
        ----------
        origin : (int, int, int) or None
            Full-resolution (z, y, x) scan position of voxel (0, 0, 0) of a
            cropped volume; ``None`` for a volume that starts at the scan's origin.
            Every level keeps voxel (0, 0, 0)'s corner at that position.
        """
        translation = None if origin is None else (float(origin[0]), float(origin[1]), float(origin[2]))
        datasets = tuple(
            Dataset(str(level), (float(2**level), float(2**level), float(2**level)), translation)
            for level in range(nlevels)
        )
        return cls(name, datasets, downsampling, downsampling_parameters or {})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Multiscale:
        """Read an entry this module wrote (or any 0.4 entry with scale/translation transforms)."""
        datasets = []
        for entry in data["datasets"]:
            scale = translation = None
            for transform in entry.get("coordinateTransformations", []):
                if transform["type"] == "scale":
                    scale = tuple(float(v) for v in transform["scale"])
                elif transform["type"] == "translation":
                    translation = tuple(float(v) for v in transform["translation"])
            # as the entry has them (None, or not three values): ngff.read checks each dataset and says what is wrong
            datasets.append(Dataset(str(entry["path"]), scale, translation))  # type: ignore[arg-type]
        metadata = dict(data.get("metadata", {}))
        metadata.pop("method", None)
        return cls(str(data.get("name", "")), tuple(datasets), str(data.get("type", "")), metadata)


def attributes(multiscale: Multiscale) -> dict[str, Any]:
    """The group attributes that hold ``multiscale``: a top-level ``multiscales`` list."""
    return {"multiscales": [multiscale.to_json()]}


def entries(attrs: dict[str, Any]) -> Any:
    """The ``multiscales`` value of group attributes (unchecked), or ``None`` if there is none."""
    return attrs.get("multiscales")


def without(attrs: dict[str, Any]) -> dict[str, Any]:
    """The group attributes without ``multiscales``."""
    return {key: value for key, value in attrs.items() if key != "multiscales"}
