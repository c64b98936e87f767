"""Every output layout scroll_to_ome writes, read back by readers that are not ours.

Zarr 2 and 3, uncompressed and four compressors, unsharded and three kinds of shard, uint16 and uint8:
each store is written by the real script from an odd-sized stack with all-zero regions, and every level
read with zarr 3 and with tensorstore equals tests/reference.py's pyramid.  The shard files are parsed
here with numpy, google_crc32c and numcodecs (not with scrollzarr's code), compared with what zarr-python
writes for the same array, and the stores are read by zarr 2.18 (khartes' reader) and checked by
ome-zarr-models.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pytest
import tensorstore as ts
import tifffile
import zarr
import zarr.codecs
from ome_zarr_models.v04.image import Image as ImageV04
from ome_zarr_models.v05.image import Image as ImageV05
from test_layers_formats import default, ppm_to_layers, sheet  # noqa: F401 (its fixtures)
from test_readers import READ_WITH_ZARR2, ZARR2

from scrollzarr import pipeline, presets

from conftest import assert_ok, assert_one_line_error, scroll_to_ome, store_files, write_stack
from reference import pyramid

SHAPE = (37, 70, 90)  # z, y, x: no axis a multiple of the chunk or of any shard
CHUNK = 16
NLEVELS = 4
COMPRESSORS = ("none", "blosc-zstd", "blosc-lz4", "zstd", "gzip")
SHARDS = {
    "unsharded": None,
    "flat": (16, 64, 48),  # one chunk deep, 4 x 3 chunks wide
    "deep": (32, 32, 32),
    "whole": (64, 128, 128),  # larger than every level
}


def make_volume() -> np.ndarray:
    """The stack: noise with all-zero regions that make whole zero chunks at levels 0 and 1, a zero shard
    of each kind of shard but the whole one, and zero inner chunks beside non-zero ones in a shard."""
    volume = np.random.default_rng(13).integers(1, 65535, size=SHAPE, dtype=np.uint16)
    volume[:, :32, :32] = 0  # the deep shard (0, 0, 0); chunks (*, 0..1, 0..1)
    volume[:16, :, :48] = 0  # the flat shards (0, 0, 0) and (0, 1, 0); half of the deep shard (0, 0, 1)
    return volume


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, np.ndarray]:
    directory = tmp_path_factory.mktemp("formats") / "slices"
    volume = make_volume()
    write_stack(directory, volume)
    return directory, volume


def layout_args(zarr_format: int, compressor: str, shard: str) -> list[object]:
    args: list[object] = ["--zarr_format", zarr_format, "--compressor", compressor]
    if SHARDS[shard] is not None:
        args += ["--shard_shape", ",".join(map(str, SHARDS[shard]))]
    return args


class Stores:
    """The stores the real script writes, one per set of options, made once per module."""

    def __init__(self, stack: Path, root: Path) -> None:
        self.stack, self.root, self.made = stack, root, {}

    def __call__(self, *args: object) -> Path:
        key = tuple(map(str, args))
        if key not in self.made:
            out = self.root / str(len(self.made)) / "out.zarr"
            assert_ok(scroll_to_ome(self.stack, out, "--chunk_size", CHUNK, "--nlevels", NLEVELS, *args, "--quiet"))
            self.made[key] = out
        return self.made[key]


@pytest.fixture(scope="module")
def stores(stack, tmp_path_factory) -> Stores:
    return Stores(stack[0], tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="module")
def levels(stack) -> dict[int, list[np.ndarray]]:
    """The reference pyramids by --obytes: uint16, and uint8 as value // 256 (the README's rule without a window)."""
    volume = stack[1]
    return {0: pyramid(volume, NLEVELS), 1: pyramid((volume // 256).astype(np.uint8), NLEVELS)}


# uint16 on every combination; uint8 on a few (the codecs see another item size: blosc shuffles bytes)
CASES = [(fmt, comp, "unsharded", 0) for fmt in (2, 3) for comp in COMPRESSORS]
CASES += [(3, comp, shard, 0) for comp in COMPRESSORS for shard in ("flat", "deep", "whole")]
CASES += [
    (2, "blosc-zstd", "unsharded", 1),
    (3, "blosc-lz4", "flat", 1),
    (3, "gzip", "deep", 1),
    (3, "none", "whole", 1),
]


def case_id(case: tuple) -> str:
    fmt, comp, shard, obytes = case
    return f"zarr{fmt}-{comp}-{shard}-{'uint8' if obytes else 'uint16'}"


def read_tensorstore(path: Path, zarr_format: int) -> np.ndarray:
    driver = "zarr" if zarr_format == 2 else "zarr3"
    return (
        ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}, read=True)
        .result()
        .read()
        .result()
    )


@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_every_layout_reads_back_as_the_reference_in_zarr_and_tensorstore(stores, levels, case):
    fmt, comp, shard, obytes = case
    out = stores(*layout_args(fmt, comp, shard), "--obytes", obytes)
    for level, expected in enumerate(levels[obytes]):
        array = zarr.open_array(out / str(level), mode="r")
        assert array.metadata.zarr_format == fmt and array.dtype == expected.dtype
        assert array.chunks == (CHUNK,) * 3
        if fmt == 3:
            assert array.shards == SHARDS[shard]
        np.testing.assert_array_equal(array[...], expected, err_msg=f"zarr, level {level}")
        np.testing.assert_array_equal(read_tensorstore(out / str(level), fmt), expected, err_msg=f"tensorstore {level}")
    check_unit_files([out / str(n) for n in range(NLEVELS)], fmt, comp, SHARDS[shard], levels[obytes])


# --- the files themselves, parsed here --------------------------------------------------------------------

MISSING = 2**64 - 1


def numcodec(compressor: str):
    """What decodes one stored chunk (blosc's header says how it was made)."""
    return {
        "none": None,
        "blosc-zstd": numcodecs.Blosc(),
        "blosc-lz4": numcodecs.Blosc(),
        "zstd": numcodecs.Zstd(),
        "gzip": numcodecs.GZip(),
    }[compressor]


def padded_chunk(level: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    """Chunk ``index`` of ``level``, padded with zeros to a whole chunk as zarr stores edge chunks."""
    part = level[tuple(slice(i * CHUNK, (i + 1) * CHUNK) for i in index)]
    whole = np.zeros((CHUNK,) * 3, level.dtype)
    whole[tuple(slice(0, n) for n in part.shape)] = part
    return whole


def decoded(data: bytes, compressor: str, dtype: np.dtype) -> np.ndarray:
    if compressor == "gzip":  # no time in the header (RFC 1952's MTIME 0): a run writes the same bytes any day
        assert data[4:8] == bytes(4), data[:10]
    codec = numcodec(compressor)
    raw = data if codec is None else codec.decode(data)
    return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).reshape((CHUNK,) * 3)


def parse_shard(path: Path, inner: int) -> tuple[np.ndarray, bytes]:
    """A shard file's index as (inner chunks, 2) uint64 (offset, nbytes) in C order, with the file's bytes;
    the index's CRC-32C checked."""
    data = path.read_bytes()
    index_bytes = 16 * inner
    assert len(data) >= index_bytes + 4, path
    index = data[-index_bytes - 4 : -4]
    assert google_crc32c.value(index) == int.from_bytes(data[-4:], "little"), f"{path}: index checksum"
    return np.frombuffer(index, "<u8").reshape(inner, 2), data


def check_unit_files(directories: list[Path], fmt: int, compressor: str, shard, levels: list[np.ndarray]) -> None:
    """The files of every level (its directory, its reference voxels): a file for each unit (chunk or shard)
    that holds a non-zero voxel and for no other; each stored chunk decodes to the reference's padded chunk
    and is not all zero; a shard's index has an entry for each non-zero inner chunk and none for the others,
    inside the chunk bytes, not overlapping."""
    unit = shard or (CHUNK,) * 3
    for number, (directory, level) in enumerate(zip(directories, levels, strict=True)):
        names = {".zarray", ".zattrs"} if fmt == 2 else {"zarr.json"}
        found = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - names
        grid = [math.ceil(n / u) for n, u in zip(level.shape, unit, strict=True)]
        expected = set()
        for index in itertools.product(*map(range, grid)):
            region = level[tuple(slice(i * u, (i + 1) * u) for i, u in zip(index, unit, strict=True))]
            if region.any():
                key = "/".join(map(str, index))
                expected.add(key if fmt == 2 else f"c/{key}")
        assert found == expected, f"level {number}: unit files {sorted(found ^ expected)} wrong"
        for key in sorted(found):
            index = tuple(int(i) for i in key.split("/")[-3:])
            path = directory / key
            if shard is None:
                chunk = decoded(path.read_bytes(), compressor, level.dtype)
                np.testing.assert_array_equal(chunk, padded_chunk(level, index), err_msg=str(path))
                continue
            per_shard = tuple(s // CHUNK for s in shard)
            entries, data = parse_shard(path, math.prod(per_shard))
            chunk_end = len(data) - 16 * len(entries) - 4
            stored = []
            for entry, inner in zip(entries, itertools.product(*map(range, per_shard)), strict=True):
                where = tuple(i * n + j for i, n, j in zip(index, per_shard, inner, strict=True))
                outside = any(w * CHUNK >= n for w, n in zip(where, level.shape, strict=True))
                reference = None if outside else padded_chunk(level, where)
                if entry[0] == MISSING:
                    assert entry[1] == MISSING, f"{path} {inner}"
                    assert reference is None or not reference.any(), f"{path}: non-zero inner chunk {inner} missing"
                    continue
                offset, nbytes = int(entry[0]), int(entry[1])
                assert reference is not None, f"{path}: an entry for inner chunk {inner} beyond the level"
                assert offset + nbytes <= chunk_end, f"{path}: inner chunk {inner} past the chunk bytes"
                chunk = decoded(data[offset : offset + nbytes], compressor, level.dtype)
                assert chunk.any(), f"{path}: all-zero inner chunk {inner} stored"
                np.testing.assert_array_equal(chunk, reference, err_msg=f"{path} {inner}")
                stored.append((offset, nbytes))
            stored.sort()
            assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(stored)), f"{path}: overlapping chunks"


# --- the same arrays written by zarr-python ----------------------------------------------------------------


def zarr_codec(compressor: str, itemsize: int):
    """zarr-python's codec for ``compressor`` at its default level, as the README documents the defaults."""
    if compressor.startswith("blosc-"):
        shuffle = "bitshuffle" if itemsize > 1 else "shuffle"
        return zarr.codecs.BloscCodec(
            cname=compressor[6:], clevel=5 if compressor == "blosc-lz4" else 3, shuffle=shuffle
        )
    return {"none": None, "zstd": zarr.codecs.ZstdCodec(level=3), "gzip": zarr.codecs.GzipCodec(level=6)}[compressor]


GZIP_HEADER = 10  # bytes (RFC 1952): magic, method, flags, time (4), extra flags, operating system


def inner_chunks(path: Path, shard: tuple[int, int, int]) -> dict[int, bytes]:
    """The stored inner chunks of a shard file, by their place in the shard's C order, as their encoded bytes."""
    entries, data = parse_shard(path, math.prod(s // CHUNK for s in shard))
    return {i: data[int(o) : int(o) + int(n)] for i, (o, n) in enumerate(entries) if o != MISSING}


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("shard", ["flat", "deep"])
def test_shards_hold_what_zarr_python_writes(stores, levels, tmp_path, compressor, shard):
    """zarr-python writes the same level 0 with the same shards and codec: the same voxels, the same shard
    files (zarr leaves out empty inner chunks and empty shards too), the same inner chunks, byte for byte.

    (Gzip's 10-byte headers aside: zarr's hold the time of the write, ours 0, so that a resumed run writes
    the bytes of an uninterrupted one.)  Not the same files byte for byte: zarr-python 3 puts a shard's
    inner chunks in the file in Morton order (its index in C order, as the spec says), ours go in C order.
    Readers go through the index.
    """
    out = stores(*layout_args(3, compressor, shard), "--obytes", 0)
    level = levels[0][0]
    theirs = zarr.create_array(
        tmp_path / "zarr.zarr", shape=level.shape, chunks=(CHUNK,) * 3, shards=SHARDS[shard], dtype=level.dtype,
        compressors=zarr_codec(compressor, 2), fill_value=0, zarr_format=3, dimension_names=("z", "y", "x"),
    )  # fmt: skip
    theirs[...] = level
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[...], theirs[...])
    ours = sorted(str(p.relative_to(out / "0")) for p in (out / "0" / "c").rglob("*") if p.is_file())
    written = sorted(str(p.relative_to(tmp_path / "zarr.zarr")) for p in (tmp_path / "zarr.zarr" / "c").rglob("*"))
    assert ours == [name for name in written if (tmp_path / "zarr.zarr" / name).is_file()]
    for name in ours:
        mine, zarrs = (
            inner_chunks(out / "0" / name, SHARDS[shard]),
            inner_chunks(tmp_path / "zarr.zarr" / name, SHARDS[shard]),
        )
        assert sorted(mine) == sorted(zarrs), name
        skip = GZIP_HEADER if compressor == "gzip" else 0
        differ = [i for i in mine if mine[i][skip:] != zarrs[i][skip:]]
        assert not differ, f"{name}: inner chunks {differ} encoded otherwise than zarr's"


# --- other readers -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not ZARR2, reason="SCROLLZARR_ZARR2_PATH is not set (make test sets it)")
@pytest.mark.parametrize("compressor", ["blosc-zstd", "blosc-lz4", "zstd", "gzip"])
def test_zarr_2_18_reads_compressed_zarr_2_stores(stores, levels, tmp_path, compressor):
    out = stores(*layout_args(2, compressor, "unsharded"), "--obytes", 0)
    env = dict(os.environ, PYTHONPATH=ZARR2)
    result = subprocess.run(
        [sys.executable, "-c", READ_WITH_ZARR2, out, tmp_path], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == NLEVELS
    for number, expected in enumerate(levels[0]):
        np.testing.assert_array_equal(np.load(tmp_path / f"{number}.npy"), expected)


@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_ome_zarr_models_validates_every_store(stores, case):
    fmt, comp, shard, obytes = case
    out = stores(*layout_args(fmt, comp, shard), "--obytes", obytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ValidationWarning is a failure too
        (ImageV04 if fmt == 2 else ImageV05).from_zarr(zarr.open_group(out, mode="r"))
    if fmt == 3:
        for number in range(NLEVELS):
            assert json.loads((out / str(number) / "zarr.json").read_text())["dimension_names"] == ["z", "y", "x"]
        assert json.loads((out / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"
    else:
        assert json.loads((out / ".zattrs").read_text())["multiscales"][0]["version"] == "0.4"


@pytest.mark.parametrize("compressor,shard", [("blosc-zstd", "deep"), ("none", "flat"), ("zstd", "unsharded")])
def test_zarr_only_writes_a_plain_zarr_3_array(stack, levels, tmp_path, compressor, shard):
    out = tmp_path / "plain.zarr"
    args = layout_args(3, compressor, shard)
    assert_ok(scroll_to_ome(stack[0], out, "--chunk_size", CHUNK, "--nlevels", 1, "--zarr_only", *args, "--quiet"))
    array = zarr.open_array(out, mode="r")
    assert array.metadata.zarr_format == 3 and array.shards == SHARDS[shard]
    np.testing.assert_array_equal(array[...], levels[0][0])
    np.testing.assert_array_equal(read_tensorstore(out, 3), levels[0][0])
    check_unit_files([out], 3, compressor, SHARDS[shard], [levels[0][0]])


# --- two writers never share a shard ---------------------------------------------------------------------

WIDE = (40, 50, 300)  # z, y, x: wide enough that a small --max_gb cuts planes into columns


@pytest.fixture(scope="module")
def wide_stack(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wide") / "slices"
    volume = np.random.default_rng(3).integers(1, 65535, size=WIDE, dtype=np.uint16)
    volume[:, :, :64] = 0
    write_stack(directory, volume)
    return directory


@pytest.mark.parametrize(
    "nlevels,max_gb,shard",
    [
        (1, 0.0002, (16, 32, 32)),  # level 0 in bands of 128 columns
        (1, 0.0002, (32, 32, 32)),  # of 64 columns, two slabs of 16 slices into each shard
        (3, 0.0015, (16, 32, 32)),  # levels 1 and 2 from level 0 read back in blocks of 32 columns
        (3, 0.0015, (32, 32, 32)),
    ],
)
def test_bands_and_blocks_of_whole_shards_write_the_whole_plane_run_bytes(wide_stack, tmp_path, nlevels, max_gb, shard):
    """Cut into column bands or read-back blocks by --max_gb, with two workers, a run writes the very files
    of the run in whole planes: a shard written by two tasks would hold only one task's chunks (each writes
    the whole file), so would differ."""
    args = [
        "--chunk_size", CHUNK, "--nlevels", nlevels, "--workers", 2, "--zarr_format", 3, "--compressor", "blosc-zstd",
        "--shard_shape", ",".join(map(str, shard)),
    ]  # fmt: skip
    options = presets.resolve(
        None, {"zarr_format": 3, "shard_shape": ",".join(map(str, shard)), "chunk_size": CHUNK, "nlevels": nlevels,
               "compressor": "blosc-zstd", "max_gb": max_gb, "workers": 2},
    )  # fmt: skip
    plan = pipeline.plan_conversion(wide_stack, tmp_path / "cut" / "out.zarr", options)
    if nlevels == 1:
        assert plan.bands.cols < WIDE[2] and plan.bands.cols % shard[2] == 0, plan.bands
    else:
        assert plan.bands.streamed == 0 and plan.blocks[0][2] < WIDE[2] // 2, plan.blocks  # level 1 in columns
        assert plan.blocks[0][2] % shard[2] == 0, plan.blocks
    assert_ok(scroll_to_ome(wide_stack, tmp_path / "whole" / "out.zarr", *args, "--quiet"))
    assert_ok(scroll_to_ome(wide_stack, tmp_path / "cut" / "out.zarr", *args, "--max_gb", max_gb, "--quiet"))
    whole, cut = store_files(tmp_path / "whole" / "out.zarr"), store_files(tmp_path / "cut" / "out.zarr")
    assert sorted(cut) == sorted(whole)
    assert [name for name in whole if cut[name] != whole[name]] == []


# --- ppm_to_layers renders from every layout ---------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        ["--zarr_format", 3, "--shard_shape", "64,64,64", "--compressor", "blosc-zstd"],
        ["--zarr_format", 2, "--compressor", "blosc-lz4"],
        ["--zarr_format", 3, "--compressor", "gzip"],
    ],
    ids=["zarr3-sharded-blosc-zstd", "zarr2-blosc-lz4", "zarr3-gzip"],
)
def test_ppm_to_layers_renders_our_stores_as_the_default_store(tmp_path, default, sheet, layout):  # noqa: F811
    """The synthetic scroll of tests/test_layers_formats.py converted with ``layout`` by the real script renders
    the very files (layers and stacked image, byte for byte) the default store renders, at both levels."""
    store = tmp_path / "volume.zarr"
    assert_ok(scroll_to_ome(default.parent / "tiffs", store, "--chunk_size", 32, "--nlevels", 2, *layout, "--quiet"))
    for level in (0, 1):
        options = ["--number_of_layers", 5, "--level", level, "--quiet"]
        expected, got = tmp_path / f"default{level}", tmp_path / f"ours{level}"
        assert_ok(ppm_to_layers(sheet, default, expected / "layers", expected / "stacked.tif", *options))
        assert_ok(ppm_to_layers(sheet, store, got / "layers", got / "stacked.tif", *options))
        theirs, ours = layer_files(expected), layer_files(got)
        assert len(ours) == 6 and all(tifffile.imread(expected / name).any() for name in ours)
        assert sorted(ours) == sorted(theirs)
        assert [name for name in ours if ours[name] != theirs[name]] == [], f"level {level}"


def layer_files(directory: Path) -> dict[str, bytes]:
    """The images of a render, by relative path (not the manifest of the layers, which names the volume)."""
    return {name: data for name, data in store_files(directory).items() if not Path(name).name.startswith(".")}


@pytest.mark.parametrize("max_gb", [0.00001, 0.0001, 0.0003])
def test_max_gb_too_small_for_the_shards_quotes_a_bound_that_is_enough(wide_stack, tmp_path, max_gb):
    """Whether the bands or the read-back levels do not fit, the bound quoted is one the run accepts."""
    out = tmp_path / "out.zarr"
    args = ["--chunk_size", CHUNK, "--nlevels", 3, "--zarr_format", 3, "--shard_shape", "16,32,64"]
    result = scroll_to_ome(wide_stack, out, *args, "--max_gb", max_gb)
    assert_one_line_error(result, f"--max_gb {max_gb:.3g} is too small for shards of 16 x 32 x 64", code=2)
    enough = re.search(r"at least ([0-9.e-]+) GB", result.stderr).group(1)
    assert float(enough) > max_gb
    assert_ok(scroll_to_ome(wide_stack, out, *args, "--max_gb", enough, "--quiet"))
