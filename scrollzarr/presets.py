"""``--preset``: the layouts users ask for by name, each a bundle of options; an option given beside one wins."""

from __future__ import annotations

import dataclasses
from typing import Any

from scrollzarr.errors import UsageError
from scrollzarr.options import Options

# Each preset's settings, by Options field (the README's table shows the same).
PRESETS: dict[str, dict[str, Any]] = {
    # the layout of the published volumes: uint8 (value // 256 unless --window is given), zarr 2, uncompressed
    "open-data": {"obytes": 1, "chunk_size": 128, "nlevels": 6, "zarr_format": 2, "compressor": "none"},
    "open-data-zstd": {"obytes": 1, "chunk_size": 128, "nlevels": 6, "zarr_format": 2, "compressor": "blosc-zstd"},
    # shards one chunk row deep: a streamed level holds chunk_size planes, as without shards
    "v3-sharded": {
        "chunk_size": 128,
        "zarr_format": 3,
        "shard_shape": (128, 1024, 1024),
        "compressor": "blosc-zstd",
    },
}

# The Options fields the command line gives (all but the preset itself), under the same names.
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(Options) if field.name != "preset")


def parse_shard_shape(text: str) -> tuple[int, int, int]:
    """``--shard_shape`` text ``"Z,Y,X"`` (voxels) as a (z, y, x) tuple.

    Raises
    ------
    UsageError
        If the text is not three whole numbers separated by commas.
    """
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 3 or not all(part.isascii() and part.isdigit() for part in parts):
        raise UsageError(f"--shard_shape must be three whole numbers Z,Y,X (voxels), e.g. 128,1024,1024, not {text!r}")
    z, y, x = (int(part) for part in parts)
    return z, y, x


# What --first_new_level takes from the store instead (the layout, and the dtype), in the order they are named.
CONVERSION_ONLY = ("preset", "zarr_format", "shard_shape", "compressor", "clevel", "window", "obytes")


def resolve(preset: str | None, given: dict[str, Any], rebuild: bool = False) -> Options:
    """The options of a run: the defaults, then ``preset``'s settings, then the options the user gave.

    Parameters
    ----------
    preset : str or None
        A name of :data:`PRESETS`.
    given : dict
        Options fields as the command line gives them, ``None`` for an option not given;
        ``shard_shape`` as its ``"Z,Y,X"`` text.
    rebuild : bool
        For ``--first_new_level``: the options of :data:`CONVERSION_ONLY` are refused when given at all
        (even with their default values: the new levels keep the store's layout and dtype).

    Raises
    ------
    UsageError
        For an unknown preset, malformed ``shard_shape`` text, settings that do not go together, or an
        option of a conversion given to a rebuild.
    """
    if rebuild:
        named = {**given, "preset": preset}
        for name in CONVERSION_ONLY:
            if named.get(name) is not None:
                kept = "dtype" if name == "obytes" else "layout"
                raise UsageError(
                    f"--{name} applies when converting TIFFs; new levels keep the {kept} of the level above"
                )
    settings: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
        settings |= PRESETS[preset]
    chosen = {name: value for name, value in given.items() if value is not None and name in OPTION_NAMES}
    if "shard_shape" in chosen:
        chosen["shard_shape"] = parse_shard_shape(chosen["shard_shape"])
    if (
        settings.get("shard_shape") is not None
        and "shard_shape" not in chosen
        and chosen.get("zarr_format", settings["zarr_format"]) != 3
    ):
        raise UsageError(f"--preset {preset} writes shards, which zarr format 2 has not: leave out --zarr_format 2")
    settings |= chosen
    return Options(**settings, preset=preset)
