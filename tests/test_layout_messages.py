"""Messages of the output layouts not checked elsewhere: shard shapes, chunk sizes that do not divide a store's
shards, stores whose layout our writers do not write, and damaged unit files of every kind; and --clevel
reaching the metadata and the bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import ShardingCodec

from scrollzarr.layout import StoreLayout
from scrollzarr.sinks import SinkSpec, damage

from conftest import assert_ok, assert_one_line_error, scroll_to_ome, write_stack

SHAPE = (20, 40, 50)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("messages") / "slices"
    write_stack(directory, np.random.default_rng(5).integers(1, 60000, size=SHAPE, dtype=np.uint16))
    return directory


@pytest.mark.parametrize("text", ["0,128,128", "128,0,128"])
def test_a_shard_edge_of_zero_is_refused(stack, tmp_path, text):
    result = scroll_to_ome(stack, tmp_path / "o.zarr", "--zarr_format", 3, "--shard_shape", text)
    assert_one_line_error(result, f"--shard_shape must be three positive numbers Z,Y,X, not {text}", code=2)


def test_a_chunk_size_that_does_not_divide_the_stores_shards_is_refused(stack, tmp_path):
    out = tmp_path / "o.zarr"
    assert_ok(scroll_to_ome(stack, out, "--zarr_format", 3, "--chunk_size", 16, "--shard_shape", "16,32,48",
                            "--nlevels", 2, "--quiet"))  # fmt: skip
    result = scroll_to_ome("unused", out, "--first_new_level", 1, "--nlevels", 3, "--chunk_size", 32)
    assert_one_line_error(result, "--chunk_size 32 does not divide the shards of", "(16,32,48)", code=2)


def test_clevel_reaches_the_metadata_and_the_bytes(tmp_path):
    # smooth, so that zstd compresses it, and differently at levels 1 and 19 (noise is stored as it is)
    z, y, x = np.indices(SHAPE)
    write_stack(tmp_path / "smooth", ((z * 7 + y * 3 + x) % 4000).astype(np.uint16))
    out = tmp_path / "o.zarr"
    assert_ok(scroll_to_ome(tmp_path / "smooth", out, "--compressor", "zstd", "--clevel", 19, "--chunk_size", 16,
                            "--quiet"))  # fmt: skip
    assert json.loads((out / "0" / ".zarray").read_text())["compressor"] == {"id": "zstd", "level": 19}
    volume = zarr.open_array(str(out / "0"), mode="r")[...]
    chunk = np.zeros((16, 16, 16), np.uint16)
    chunk[...] = volume[:16, :16, :16]
    assert (out / "0" / "0" / "0" / "0").read_bytes() == numcodecs.Zstd(level=19).encode(chunk)
    assert numcodecs.Zstd(level=19).encode(chunk) != numcodecs.Zstd(level=1).encode(chunk)  # the level shows


def rebuild(store: Path) -> object:
    return scroll_to_ome("unused", store, "--first_new_level", 1, "--nlevels", 3)


def test_a_store_whose_shard_index_comes_first_is_refused(stack, tmp_path):
    """zarr writes such shards; ours put the index at the end: new levels would not match, so no rebuild."""
    out = tmp_path / "o.zarr"
    assert_ok(scroll_to_ome(stack, out, "--zarr_format", 3, "--chunk_size", 16, "--shard_shape", "16,32,48",
                            "--nlevels", 2, "--quiet"))  # fmt: skip
    data = zarr.open_array(str(out / "0"), mode="r")[...]
    shutil.rmtree(out / "0")
    level = zarr.create_array(
        str(out / "0"), shape=data.shape, dtype="uint16", fill_value=0, zarr_format=3, chunks=(16, 32, 48),
        serializer=ShardingCodec(chunk_shape=(16, 16, 16), index_location="start"), compressors=None,
        dimension_names=("z", "y", "x"),
    )  # fmt: skip
    level[...] = data
    assert_one_line_error(rebuild(out), "level 0 uses a shard index other than zarr's default", code=1)


def test_a_level_with_a_codec_numcodecs_does_not_know_is_refused(stack, tmp_path):
    out = tmp_path / "o.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", 16, "--nlevels", 2, "--quiet"))
    metadata = json.loads((out / "0" / ".zarray").read_text())
    (out / "0" / ".zarray").write_text(json.dumps({**metadata, "compressor": {"id": "imagecodecs_foo"}}))
    assert_one_line_error(rebuild(out), f"{out}: level 0 cannot be opened", "convert the TIFFs again", code=1)


def spec(tmp_path: Path, compressor: str, shard: tuple[int, int, int] | None) -> SinkSpec:
    layout = StoreLayout(3 if shard else 2, 16, shard, compressor)
    return SinkSpec(tmp_path, (32, 32, 32), "uint16", layout)


def shard_file(path: Path, entries: np.ndarray, body: bytes, checksum: int | None = None) -> Path:
    """A shard file written by the test: ``body``, then the index ``entries`` (n, 2) and its CRC-32C."""
    index = entries.astype("<u8").tobytes()
    crc = google_crc32c.value(index) if checksum is None else checksum
    path.write_bytes(body + index + crc.to_bytes(4, "little"))
    return path


CHUNK_BYTES = 16**3 * 2
MISSING = 2**64 - 1


def test_damaged_shards_say_what_is_wrong(tmp_path):
    sharded = spec(tmp_path, "none", (32, 32, 32))  # 8 inner chunks: an index of 8 x 16 + 4 = 132 bytes
    (tmp_path / "short").write_bytes(bytes(100))
    assert damage(tmp_path / "short", sharded) == "100 bytes, shorter than its index of 132"
    entries = np.full((8, 2), MISSING, np.uint64)
    entries[0] = (0, CHUNK_BYTES)
    good = shard_file(tmp_path / "good", entries, bytes(CHUNK_BYTES))
    assert damage(good, sharded) is None
    bad_crc = shard_file(tmp_path / "crc", entries, bytes(CHUNK_BYTES), checksum=1)
    assert damage(bad_crc, sharded) == "its index's checksum does not match"
    past = entries.copy()
    past[1] = (CHUNK_BYTES, CHUNK_BYTES)
    assert (
        damage(shard_file(tmp_path / "past", past, bytes(CHUNK_BYTES)), sharded) == "its index points past the chunks"
    )
    odd = entries.copy()
    odd[0] = (0, 100)
    assert damage(shard_file(tmp_path / "odd", odd, bytes(CHUNK_BYTES)), sharded) == (
        f"its index gives chunks other than {CHUNK_BYTES} bytes"
    )
    compressed = spec(tmp_path, "gzip", (32, 32, 32))
    garbage = entries.copy()
    garbage[0] = (0, 64)
    path = shard_file(tmp_path / "garbage", garbage, bytes(64))
    assert damage(path, compressed) is None  # the index is sound; only decoding tells
    assert damage(path, compressed, decode=True).startswith("an inner chunk at byte 0 cannot be decoded as gzip")


def test_damaged_compressed_chunks_say_what_is_wrong(tmp_path):
    chunk = np.arange(16**3, dtype=np.uint16).reshape(16, 16, 16)
    gz = tmp_path / "gzip"
    gz.write_bytes(numcodecs.GZip(6).encode(chunk)[:-4] + bytes(4))  # the trailing size says 0
    assert damage(gz, spec(tmp_path, "gzip", None)) == f"it does not end as a gzip stream of {CHUNK_BYTES} bytes"
    zs = tmp_path / "zstd"
    zs.write_bytes(b"not zstd at all")
    assert damage(zs, spec(tmp_path, "zstd", None)) == "it does not start as a zstd frame"
    cut = tmp_path / "zstd-cut"
    cut.write_bytes(numcodecs.Zstd(3).encode(chunk)[:7])
    assert damage(cut, spec(tmp_path, "zstd", None)).startswith("its zstd frame is cut short: a block at byte")
    wrong = tmp_path / "zstd-wrong"
    wrong.write_bytes(numcodecs.Zstd(3).encode(chunk[:8]))  # a whole frame of half a chunk
    assert damage(wrong, spec(tmp_path, "zstd", None), decode=True) == (
        f"decodes to {CHUNK_BYTES // 2} bytes, not {CHUNK_BYTES}"
    )
    assert damage(zs, spec(tmp_path, "zstd", None), decode=True).startswith("cannot be decoded as zstd")


def test_a_chunk_size_that_would_overfill_the_stores_shards_is_refused(stack, tmp_path):
    """The conversion's bound of 65,536 chunks a shard holds for --first_new_level's --chunk_size too."""
    out = tmp_path / "o.zarr"
    assert_ok(scroll_to_ome(stack, out, "--zarr_format", 3, "--chunk_size", 16, "--shard_shape", "32,64,48",
                            "--nlevels", 2, "--quiet"))  # fmt: skip
    result = scroll_to_ome("unused", out, "--first_new_level", 1, "--nlevels", 3, "--chunk_size", 1)
    assert_one_line_error(
        result, "--chunk_size 1 would make the shards of", "(32,64,48) hold 98,304 chunks; at most 65,536", code=2
    )


def test_a_rebuild_from_a_damaged_level_leaves_the_store_finished(stack, tmp_path):
    """The damage is found before the store is marked unfinished: it stays a finished, readable store (a rebuild
    record would send ppm_to_layers users to a --resume that fails again)."""
    out = tmp_path / "o.zarr"
    assert_ok(scroll_to_ome(stack, out, "--zarr_format", 3, "--compressor", "zstd", "--chunk_size", 16,
                            "--shard_shape", "16,32,48", "--nlevels", 2, "--quiet"))  # fmt: skip
    shard = out / "0" / "c" / "1" / "0" / "0"
    with open(shard, "r+b") as file:
        file.truncate(shard.stat().st_size - 100)
    before = zarr.open_group(str(out), mode="r").attrs.asdict()
    result = scroll_to_ome("unused", out, "--first_new_level", 1, "--nlevels", 3)
    assert_one_line_error(result, f"chunk file {shard} is damaged", "convert the TIFFs again", code=1)
    assert zarr.open_group(str(out), mode="r").attrs.asdict() == before
    assert not (out / "scrollzarr_progress.json").exists()


@pytest.mark.parametrize("text", ["٨١٢,128,128", "1e3,128,128", "128,1024"])
def test_shard_shape_text_other_than_three_ascii_numbers_is_refused(stack, tmp_path, text):
    result = scroll_to_ome(stack, tmp_path / "o.zarr", "--zarr_format", 3, "--shard_shape", text)
    assert_one_line_error(result, "--shard_shape must be three whole numbers Z,Y,X", code=2)
