"""The layout of a store's level arrays: zarr format, chunks, shards and compression, as one plain value.

A :class:`StoreLayout` is all a writer needs to know to make a level's bytes,
and all a reader of our metadata needs to tell how they were made: it crosses
process boundaries (it is a frozen dataclass of plain values), goes into the
resume record's fingerprint, creates the level arrays through zarr's public
API (:meth:`StoreLayout.create_array`), and is read back from a level's
metadata (:func:`layout_of`) by ``--first_new_level``.

Compressed chunks are encoded with numcodecs, the codecs zarr-python itself
uses to decode them; shards follow the zarr v3 ``sharding_indexed`` codec with
its default index (``bytes`` little-endian then ``crc32c``, at the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr
import zarr.codecs
from numcodecs.abc import Codec

from scrollzarr.blocks import Shape3

COMPRESSORS = ("none", "blosc-zstd", "blosc-lz4", "zstd", "gzip")
# Default level of each compressor: blosc-zstd and zstd at 3 (zstd's own default; blosc-zstd 3 converts in
# 1.57 x the uncompressed default's time, durable, and 2.09 x from the page cache, on 2 cores: bench/RESULTS.md
# "Output layouts"), blosc-lz4 at blosc's default 5 (lz4 is fast at every level), gzip at 6 (zlib's default).
DEFAULT_CLEVEL = {"blosc-zstd": 3, "blosc-lz4": 5, "zstd": 3, "gzip": 6}
CLEVEL_RANGE = {"blosc-zstd": (0, 9), "blosc-lz4": (0, 9), "zstd": (-131072, 22), "gzip": (0, 9)}
ZarrFormat = Literal[2, 3]
ZARR_FORMATS: tuple[ZarrFormat, ...] = (2, 3)


@dataclass(frozen=True)
class StoreLayout:
    """How each level array of a store is laid out on disk.

    Attributes
    ----------
    zarr_format : {2, 3}
        2: ``.zarray`` and nested ``z/y/x`` chunk keys (OME-NGFF 0.4); 3: ``zarr.json``
        and ``c/z/y/x`` keys (OME-NGFF 0.5).
    chunk : int
        Edge of the cubic chunks, voxels.
    shard : (int, int, int) or None
        Shape of a shard, voxels (z, y, x), each a multiple of ``chunk``; zarr 3 only.
        ``None``: every chunk is a file of its own.
    compressor : str
        One of :data:`COMPRESSORS`.
    clevel : int or None
        Compression level; ``None`` for the compressor's default (:data:`DEFAULT_CLEVEL`).
    """

    zarr_format: ZarrFormat = 2
    chunk: int = 128
    shard: Shape3 | None = None
    compressor: str = "none"
    clevel: int | None = None

    def __post_init__(self) -> None:
        # the command line checks these with messages for users (options.py); this guards the library
        if self.zarr_format not in ZARR_FORMATS or self.compressor not in COMPRESSORS:
            raise ValueError(f"not a layout scrollzarr writes: {self}")
        if self.shard is not None and (self.zarr_format != 3 or any(n % self.chunk for n in self.shard)):
            raise ValueError(f"a shard must be whole chunks, in zarr format 3: {self}")

    @property
    def unit(self) -> Shape3:
        """Shape of a write unit (voxels, z, y, x): what one writer writes whole, a shard or a chunk."""
        return self.shard if self.shard is not None else (self.chunk,) * 3

    @property
    def level_clevel(self) -> int:
        """The compression level used (the default where none was given)."""
        return self.clevel if self.clevel is not None else DEFAULT_CLEVEL.get(self.compressor, 0)

    @property
    def metadata_names(self) -> tuple[str, ...]:
        """The files that describe a level array, in the order zarr writes them."""
        return (".zarray", ".zattrs") if self.zarr_format == 2 else ("zarr.json",)

    def chunk_key(self, index: tuple[int, ...]) -> str:
        """Key (path in the level's directory) of the file of write unit ``index`` (a chunk, or a shard)."""
        key = "/".join(str(i) for i in index)
        return key if self.zarr_format == 2 else f"c/{key}"

    def codec(self, dtype: np.dtype) -> Codec | None:
        """The numcodecs codec that compresses a chunk of ``dtype`` (``None``: stored raw).

        Blosc shuffles bits of multi-byte voxels (measured on scroll data: smaller
        than byte shuffle for uint16) and bytes of uint8 ones.
        """
        level = self.level_clevel
        if self.compressor.startswith("blosc-"):
            shuffle = numcodecs.Blosc.BITSHUFFLE if np.dtype(dtype).itemsize > 1 else numcodecs.Blosc.SHUFFLE
            return numcodecs.Blosc(cname=self.compressor[6:], clevel=level, shuffle=shuffle, blocksize=0)
        if self.compressor == "zstd":
            return numcodecs.Zstd(level=level)
        if self.compressor == "gzip":
            return numcodecs.GZip(level=level)
        return None

    def _zarr_compressors(self, dtype: np.dtype) -> Any:
        """The same codec as :meth:`codec`, in the form zarr's ``create_array`` takes for this format."""
        codec = self.codec(dtype)
        if codec is None or self.zarr_format == 2:
            return codec
        if isinstance(codec, numcodecs.Blosc):
            bits = codec.shuffle == numcodecs.Blosc.BITSHUFFLE
            shuffle = zarr.codecs.BloscShuffle.bitshuffle if bits else zarr.codecs.BloscShuffle.shuffle
            return zarr.codecs.BloscCodec(
                cname=codec.cname, clevel=codec.clevel, shuffle=shuffle, typesize=np.dtype(dtype).itemsize
            )
        if isinstance(codec, numcodecs.Zstd):
            return zarr.codecs.ZstdCodec(level=self.level_clevel)
        return zarr.codecs.GzipCodec(level=self.level_clevel)

    def create_array(
        self,
        parent: zarr.Group | str,
        name: str | None,
        shape: Shape3,
        dtype: np.dtype,
        overwrite: bool = True,
    ) -> zarr.Array:
        """Create one level array with this layout: fill 0, C order, nested keys, all-zero units never written.

        Parameters
        ----------
        parent : zarr.Group or str
            A group to create the array ``name`` in, or a store path for a plain array (``name`` then ``None``).
        overwrite : bool
            In a group: delete an existing array ``name`` with its chunks first.
            ``False`` writes only the metadata, keeping any chunks already there
            (``--resume`` repairing a level whose metadata a stop prevented).
        """
        settings: dict[str, Any] = {
            "shape": shape,
            "chunks": (self.chunk,) * len(shape),
            "dtype": dtype,
            "compressors": self._zarr_compressors(dtype),
            "fill_value": 0,
            # our writers skip all-zero chunks themselves, with one cheap any(); zarr's own test is much slower
            "config": {"write_empty_chunks": True},
        }
        if self.zarr_format == 2:
            settings |= {"order": "C", "filters": None, "chunk_key_encoding": {"name": "v2", "separator": "/"}}
        else:
            settings |= {"shards": self.shard, "dimension_names": ("z", "y", "x")}
        if isinstance(parent, zarr.Group):
            assert name is not None
            return parent.create_array(name, overwrite=overwrite, **settings)
        return zarr.create_array(parent, zarr_format=self.zarr_format, overwrite=overwrite, **settings)

    def describe(self) -> str:
        """The layout in words, for plans and reports."""
        ngff = "zarr 2" if self.zarr_format == 2 else "zarr 3"
        parts = [ngff, f"chunks {self.chunk}^3"]
        if self.shard is not None:
            parts.append("shards " + " x ".join(map(str, self.shard)) + " (z, y, x)")
        parts.append("uncompressed" if self.compressor == "none" else f"{self.compressor} level {self.level_clevel}")
        return ", ".join(parts)

    def fingerprint(self) -> dict[str, Any]:
        """The layout as JSON values, for the resume record."""
        return {
            "zarr_format": self.zarr_format,
            "shard_shape": None if self.shard is None else list(self.shard),
            "compressor": self.compressor,
            "clevel": self.level_clevel,
        }


class UnsupportedLayout(ValueError):
    """A level array whose layout scrollzarr does not write."""


def layout_of(array: zarr.Array) -> StoreLayout:
    """The :class:`StoreLayout` of an existing level array (as scroll_to_ome wrote it).

    Raises
    ------
    UnsupportedLayout
        If the array is laid out in a way our sinks do not write: chunks that
        are not cubic, filters, another codec, big-endian voxels, Fortran
        order, a fill value other than 0, another key encoding, nested shards,
        or a shard index other than zarr's default (at the end, little-endian,
        with a CRC-32C).
    """
    try:
        return _layout_of(array.metadata.to_dict())
    except UnsupportedLayout:
        raise
    except Exception as error:  # a codec numcodecs does not know, or metadata of another shape
        raise UnsupportedLayout(f"metadata scrollzarr does not write ({type(error).__name__}: {error})") from None


_DEFAULT_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def _layout_of(metadata: dict[str, Any]) -> StoreLayout:
    """:func:`layout_of` on the array's metadata as a JSON dict (zarr types it ``dict[str, JSON]``)."""
    if metadata.get("fill_value") not in (0, 0.0):
        raise UnsupportedLayout(f"fill value {metadata.get('fill_value')!r}")
    if metadata.get("zarr_format") == 2:
        chunks = tuple(metadata["chunks"])
        compressor = metadata.get("compressor")
        if metadata.get("filters") or metadata.get("dimension_separator", ".") != "/":
            raise UnsupportedLayout("filters, or chunk keys not separated by '/'")
        if metadata.get("order", "C") != "C" or str(metadata.get("dtype", "")).startswith(">"):
            raise UnsupportedLayout("Fortran order or big-endian voxels")
        return _from_codec(2, chunks, None, None if compressor is None else numcodecs.get_codec(compressor))
    codecs = list(metadata["codecs"])
    shard = None
    chunks = tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"])
    if codecs and codecs[0]["name"] == "sharding_indexed":
        configuration = codecs[0]["configuration"]
        if (
            configuration.get("index_location", "end") != "end"
            or [
                {
                    "name": codec["name"],
                    **({"configuration": codec["configuration"]} if codec.get("configuration") else {}),
                }
                for codec in configuration.get("index_codecs", _DEFAULT_INDEX_CODECS)
            ]
            != _DEFAULT_INDEX_CODECS
        ):
            raise UnsupportedLayout("a shard index other than zarr's default (at the end, with a CRC-32C)")
        if len(codecs) > 1:
            raise UnsupportedLayout("codecs after the sharding codec")
        shard, chunks, codecs = chunks, tuple(configuration["chunk_shape"]), list(configuration["codecs"])
    if metadata.get("chunk_key_encoding", {}).get("name") != "default":
        raise UnsupportedLayout("chunk keys other than zarr 3's default")
    if not codecs or codecs[0]["name"] != "bytes" or len(codecs) > 2:
        raise UnsupportedLayout(f"codecs {[codec['name'] for codec in codecs]}")
    if codecs[0].get("configuration", {}).get("endian", "little") != "little":
        raise UnsupportedLayout("big-endian voxels")
    return _from_codec(3, chunks, shard, _numcodec(codecs[1]) if len(codecs) == 2 else None)


def _numcodec(codec: dict[str, Any]) -> Codec:
    """The numcodecs codec of a zarr 3 codec entry (blosc, zstd or gzip)."""
    name, configuration = codec["name"], dict(codec.get("configuration", {}))
    if name == "blosc":
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[configuration.get("shuffle", "noshuffle")]
        return numcodecs.Blosc(cname=configuration["cname"], clevel=configuration["clevel"], shuffle=shuffle)
    if name == "zstd":
        return numcodecs.Zstd(level=configuration.get("level", 0))
    if name == "gzip":
        return numcodecs.GZip(level=configuration.get("level", 6))
    raise UnsupportedLayout(f"codec {name}")


def _from_codec(zarr_format: ZarrFormat, chunks: tuple[int, ...], shard: Any, codec: Codec | None) -> StoreLayout:
    if len(set(chunks)) != 1:
        raise UnsupportedLayout(f"chunks {chunks} that are not cubes")
    if codec is None:
        compressor, level = "none", None
    elif isinstance(codec, numcodecs.Blosc) and codec.cname in ("zstd", "lz4"):
        compressor, level = f"blosc-{codec.cname}", codec.clevel
    elif isinstance(codec, numcodecs.Zstd):
        compressor, level = "zstd", codec.level
    elif isinstance(codec, numcodecs.GZip):
        compressor, level = "gzip", codec.level
    else:
        raise UnsupportedLayout(f"compressor {codec}")
    return StoreLayout(zarr_format, int(chunks[0]), None if shard is None else tuple(shard), compressor, level)
