"""The compiled sampling kernel (scrollzarr.kernel), reading the voxels from chunks in place, gives the numpy
kernel's samples bit for bit, both agree with the independent trilinear reference, and a render takes the
compiled one from COMPILED_SAMPLES on."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, TransposeCodec

from scrollzarr import kernel, layers, sampling
from scrollzarr.chunkcache import ChunkCache, ChunkTable
from scrollzarr.layers import LayerOptions
from scrollzarr.ppm import write_ppm
from scrollzarr.synthetic import sheet_surface, write_stack

from conftest import assert_ok, scroll_to_ome
from reference import trilinear


def box_of(volume: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The voxels ``[lo, hi)`` of ``volume``, 0 outside it."""
    box = np.zeros(tuple(hi - lo), volume.dtype)
    src = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, volume.shape, strict=True))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
    box[dst] = volume[src]
    return box


def sampling_of(volume: np.ndarray, positions: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The numpy kernel's samples (K, M) of ``volume``."""
    lo, hi = sampling.sample_bounds(positions, normals, offsets, volume.shape)
    out = np.empty((len(offsets), positions.shape[1]), volume.dtype)
    sampling.sample_layers(box_of(volume, lo, hi), lo, positions, normals, offsets, volume.shape, out)
    return out


def chunk_table(volume: np.ndarray, chunk: tuple[int, int, int], lo: np.ndarray, hi: np.ndarray) -> ChunkTable:
    """The chunks of ``volume`` (shape ``chunk`` each, padded with zeros at its edges) holding voxels of the box
    ``[lo, hi)``; all-zero chunks left out (slot -1), as the chunk cache leaves them out."""
    first = [max(int(a), 0) // c for a, c in zip(lo, chunk, strict=True)]
    last = [(min(int(b), n) - 1) // c for b, n, c in zip(hi, volume.shape, chunk, strict=True)]
    slots = np.full([b - a + 1 for a, b in zip(first, last, strict=True)], -1, np.int32)
    arrays = []
    for index in np.ndindex(*slots.shape):
        start = [(i + f) * c for i, f, c in zip(index, first, chunk, strict=True)]
        data = volume[tuple(slice(s, s + c) for s, c in zip(start, chunk, strict=True))]
        if data.any():
            padded = np.zeros(chunk, volume.dtype)
            padded[tuple(slice(0, n) for n in data.shape)] = data
            slots[index] = len(arrays)
            arrays.append(padded)
    return ChunkTable(np.array(first), slots, arrays, chunk)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("chunk", [(8, 8, 8), (16, 4, 32), (5, 7, 6), (64, 64, 64)])
def test_the_compiled_kernel_gives_the_numpy_kernels_samples_bit_for_bit(rng, dtype, halves, chunk):
    shape = (37, 41, 53)
    volume = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    volume[:9, :10, :12] = 0  # whole chunks of zeros, left out of the table, at every chunk shape but the largest
    volume[20:, 30:] = 0
    count = 5000
    positions = np.stack([rng.uniform(-6, n + 6, count) for n in shape])  # inside, at and beyond every face
    if halves:  # exact halves and whole voxels: ties in the rounding, fractions of 0, cells on chunk faces
        positions = np.round(positions * 2) / 2
    normals = rng.normal(size=(3, count))
    normals /= np.linalg.norm(normals, axis=0)
    offsets = np.arange(13, dtype=np.float64) * 0.75 - 4.5
    lo, hi = sampling.sample_bounds(positions, normals, offsets, shape)
    table = chunk_table(volume, chunk, lo, hi)
    if chunk != (64, 64, 64):
        assert (table.slots == -1).any()
    numpy_out = np.empty((13, count), dtype)
    compiled_out = np.empty((13, count), dtype)
    sampling.sample_layers(box_of(volume, lo, hi), lo, positions, normals, offsets, shape, numpy_out)
    kernel.sample_chunks(table, positions, normals, offsets, shape, compiled_out)
    np.testing.assert_array_equal(compiled_out, numpy_out)
    for k, t in enumerate(offsets):
        exact = trilinear(volume, positions + t * normals)
        assert np.abs(compiled_out[k] - exact).max() < 0.51  # rounded, after float32 arithmetic


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_samples_of_the_widest_voxels_are_cut_to_the_largest_float32_the_dtype_holds(rng, dtype):
    # The float32 arithmetic of the definition rounds 2^32 - 1 up to 2^32, which wrapped to 0: the brightest
    # voxels rendered black (numpy) or white (compiled).
    top = np.iinfo(dtype).max
    largest = {np.uint32: 2**32 - 2**8, np.uint64: 2**64 - 2**40}[dtype]  # the float32s below 2^32 and 2^64
    shape = (8, 9, 10)
    volume = np.full(shape, top, dtype)
    volume[:, :, 5:] = 7
    count = 300
    positions = np.stack([rng.uniform(1, n - 2, count) for n in shape])
    normals = np.tile([[1.0], [0.0], [0.0]], count)
    offsets = np.array([-0.5, 0.0, 0.5])
    lo, hi = sampling.sample_bounds(positions, normals, offsets, shape)
    numpy_out = np.empty((3, count), dtype)
    compiled_out = np.empty((3, count), dtype)
    sampling.sample_layers(box_of(volume, lo, hi), lo, positions, normals, offsets, shape, numpy_out)
    kernel.sample_chunks(chunk_table(volume, (4, 4, 4), lo, hi), positions, normals, offsets, shape, compiled_out)
    np.testing.assert_array_equal(compiled_out, numpy_out)
    bright = positions[2] < 4  # every voxel of the cell is the dtype's maximum
    assert bright.any() and (numpy_out[:, bright] == largest).all()
    assert numpy_out.min() >= 7


def test_the_compiled_kernel_refuses_chunks_it_cannot_read_in_place(rng):
    volume = rng.integers(0, 255, size=(8, 8, 8)).astype(np.uint8)
    table = chunk_table(volume, (8, 8, 8), np.zeros(3, np.int64), np.full(3, 8))
    positions, normals, offsets = np.full((3, 1), 3.5), np.ones((3, 1)), np.zeros(1)
    for bad in (
        ChunkTable(table.origin, table.slots, [a.astype(np.uint16) for a in table.arrays], table.shape),
        ChunkTable(table.origin, table.slots, [np.asfortranarray(a) for a in table.arrays], table.shape),
        ChunkTable(table.origin, table.slots, [a[:4] for a in table.arrays], table.shape),
        ChunkTable(table.origin, table.slots + 1, table.arrays, table.shape),
        ChunkTable(table.origin, table.slots.astype(np.int64), table.arrays, table.shape),
    ):
        with pytest.raises(ValueError, match="chunk"):
            kernel.sample_chunks(bad, positions, normals, offsets, volume.shape, np.empty((1, 1), np.uint8))
    band = np.zeros((1, 2, 3), np.uint8)  # outputs it would write beyond: refused, nothing written
    for out, pixels in (
        (np.empty((2, 1), np.uint8), None),
        (np.empty((1, 0), np.uint8), None),
        (band, np.array([[2], [0]])),
        (band, np.array([[0], [3]])),
        (band, np.array([[0], [-1]])),
        (band, np.array([[0, 1], [0, 1]])),
    ):
        with pytest.raises(ValueError, match="do not fit in an output"):
            kernel.sample_chunks(table, positions, normals, offsets, volume.shape, out, pixels)
    assert not band.any()
    kernel.sample_chunks(table, positions, normals, offsets, volume.shape, band, np.array([[1], [2]]))
    assert band[0, 1, 2] == sampling_of(volume, positions, normals, offsets)[0, 0] and band.sum() == band[0, 1, 2]


@pytest.mark.parametrize("flip", [False, True])
def test_the_compiled_pixel_selection_gives_the_numpy_ones_bit_for_bit(rng, flip):
    block = rng.uniform(-500, 3000, (31, 40, 6))  # as a .ppm's rows: x, y, z, nx, ny, nz
    block[..., 3:] = rng.normal(size=(31, 40, 3))
    block[rng.random((31, 40)) < 0.1, 3:] = 0  # unmapped: no normal
    block[3, 4, 0], block[5, 6, 4], block[7, 8, 2], block[9, 10, 5] = np.nan, np.inf, -np.inf, np.nan
    block[11, 12, 3:] = [0.0, -0.0, 0.0]
    positions, normals = block[..., 2::-1], block[..., :2:-1]  # z, y, x views, as Ppm.rows gives them
    translation, scale = np.array([10.5, -3.0, 7.25]), np.array([2.0, 2.0, 4.0])
    want = sampling.mapped_pixels(positions, normals, flip, translation, scale)
    got = kernel.mapped_pixels(positions, normals, flip, translation, scale)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1] == 4
    for array, expected in zip(got[2:], want[2:], strict=True):
        assert array.flags.c_contiguous and array.shape == expected.shape == (3, int(want[0].sum()))
        assert array.tobytes() == expected.tobytes()
    assert not want[0][11, 12] and not want[0][3, 4]


def test_a_render_from_compiled_samples_on_takes_the_compiled_kernel_and_writes_the_same_files(tmp_path, monkeypatch):
    shape = (24, 64, 72)
    write_stack(tmp_path / "tiffs", shape)
    assert_ok(scroll_to_ome(tmp_path / "tiffs", tmp_path / "s.zarr", "--chunk_size", 16, "--nlevels", 1, "--quiet"))
    surface = sheet_surface(shape, np.arange(shape[0], dtype=np.float64), 100)
    surface[3:6, 10:40, 3:] = 0  # unmapped pixels among mapped ones: their layers and stacked value stay 0
    surface[8, 50:55, 0] = np.nan
    assert (surface[..., 3:] != 0).any(axis=-1).mean() > 0.5
    write_ppm(tmp_path / "sheet.ppm", surface)
    options = LayerOptions(layers=9, workers=2, quiet=True, stack_filter="mean")
    calls = {"numpy": 0, "compiled": 0}
    for name, module, function in (("numpy", layers, "sample_layers"), ("compiled", kernel, "sample_chunks")):
        real = getattr(module, function)

        def counting(*args, name=name, real=real):
            calls[name] += 1
            return real(*args)

        monkeypatch.setattr(module, function, counting)
    for name, threshold in (("numpy", 1 << 62), ("compiled", 0)):
        monkeypatch.setattr(layers, "COMPILED_SAMPLES", threshold)
        before = dict(calls)
        layers.ppm_to_layers(
            tmp_path / "sheet.ppm", tmp_path / "s.zarr", tmp_path / name, tmp_path / f"{name}.tif", options
        )
        assert {key: calls[key] - before[key] for key in calls} == {
            other: (calls[other] - before[other] if other == name else 0) for other in calls
        }
        assert calls[name] > before[name]
    files = sorted(path.name for path in (tmp_path / "numpy").glob("*.tif"))
    assert len(files) == 9
    for file in files:
        assert (tmp_path / "numpy" / file).read_bytes() == (tmp_path / "compiled" / file).read_bytes()
    assert (tmp_path / "numpy.tif").read_bytes() == (tmp_path / "compiled.tif").read_bytes()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_raw_chunk_files_are_read_as_zarr_reads_them_and_what_lies_beyond_the_edge_counts_as_zero(
    tmp_path, rng, zarr_format
):
    """Uncompressed chunk files are read straight from disk: an edge chunk's bytes beyond the array (which the
    format leaves to its writer) must not reach a sample, and a missing file is all zero."""
    shape, chunk = (20, 27, 35), (8, 8, 16)
    volume = rng.integers(1, 65535, size=shape).astype(np.uint16)
    volume[8:16, 8:16, 16:32] = 0  # a chunk never written
    array = zarr.create_array(
        tmp_path / "v.zarr", shape=shape, chunks=chunk, dtype="uint16", zarr_format=zarr_format,
        compressors=None, fill_value=0, chunk_key_encoding={"name": "v2" if zarr_format == 2 else "default",
        "separator": "/"},
    )  # fmt: skip
    array[...] = volume
    files = [p for p in (tmp_path / "v.zarr").rglob("*") if p.is_file() and p.name[0].isdigit()]
    assert len(files) == 3 * 4 * 3 - 1
    edge = np.full(chunk, 0xFFFF, np.uint16)  # the last chunk on every axis, its voxels beyond the edge set
    last = tuple((n - 1) // c for n, c in zip(shape, chunk, strict=True))
    inside = tuple(slice(0, n - i * c) for n, i, c in zip(shape, last, chunk, strict=True))
    edge[inside] = volume[tuple(slice(i * c, n) for n, i, c in zip(shape, last, chunk, strict=True))]
    key = "/".join(map(str, last)) if zarr_format == 2 else "c/" + "/".join(map(str, last))
    (tmp_path / "v.zarr" / key).write_bytes(edge.tobytes())
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "v.zarr", mode="r")[...], volume)  # zarr agrees

    cache = ChunkCache(zarr.open_array(tmp_path / "v.zarr", mode="r"), 1 << 30)
    count = 4000
    positions = np.stack([rng.uniform(n - 3, n + 2, count) for n in shape])  # around the far faces
    normals = rng.normal(size=(3, count))
    normals /= np.linalg.norm(normals, axis=0)
    offsets = np.linspace(-2, 2, 5)
    lo, hi = sampling.sample_bounds(positions, normals, offsets, shape)
    expected = np.empty((5, count), np.uint16)
    sampling.sample_layers(box_of(volume, lo, hi), lo, positions, normals, offsets, shape, expected)
    got = np.empty_like(expected)
    kernel.sample_chunks(cache.table(lo, hi), positions, normals, offsets, shape, got)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        cache.box(np.zeros(3, np.int64), np.array(shape) + 4),
        box_of(volume, np.zeros(3, np.int64), np.array(shape) + 4),
    )
    assert cache.chunk((1, 1, 1)) is None


def test_pieces_of_one_chunk_in_short_bands_write_the_same_files(tmp_path, monkeypatch):
    shape = (24, 64, 72)
    write_stack(tmp_path / "tiffs", shape)
    assert_ok(scroll_to_ome(tmp_path / "tiffs", tmp_path / "s.zarr", "--chunk_size", 16, "--nlevels", 1, "--quiet"))
    write_ppm(tmp_path / "sheet.ppm", sheet_surface(shape, np.arange(shape[0], dtype=np.float64), 100))
    options = LayerOptions(layers=9, workers=2, quiet=True, block_size=16)
    monkeypatch.setattr(layers, "COMPILED_SAMPLES", 0)
    layers.ppm_to_layers(tmp_path / "sheet.ppm", tmp_path / "s.zarr", tmp_path / "a", tmp_path / "a.tif", options)
    monkeypatch.setattr(layers, "BAND_BYTES", 100 * 10 * 2 * 2)  # two rows of the 9 layers and the stack
    monkeypatch.setattr(layers, "MAX_TABLE_BYTES", 16**3 * 2)  # and the pieces of tiles one chunk each
    layers.ppm_to_layers(tmp_path / "sheet.ppm", tmp_path / "s.zarr", tmp_path / "b", tmp_path / "b.tif", options)
    files = sorted(path.name for path in (tmp_path / "a").glob("*.tif"))
    assert len(files) == 9
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()


RAW_LAYOUTS = {  # zarr arrays without a compressor: whether their chunk files are the voxels as they are
    "zarr2": (True, dict(zarr_format=2, dtype="<u2")),
    "zarr3-uint8": (True, dict(zarr_format=3, dtype="uint8")),
    "zarr3": (True, dict(zarr_format=3, dtype="uint16")),
    "zarr2-big-endian": (False, dict(zarr_format=2, dtype=">u2")),
    "zarr2-fortran": (False, dict(zarr_format=2, dtype="<u2", order="F")),
    "zarr2-delta": (False, dict(zarr_format=2, dtype="<u2", filters=[numcodecs.Delta(dtype="<u2")])),
    "zarr2-fill-5": (False, dict(zarr_format=2, dtype="<u2", fill_value=5)),
    "zarr3-big-endian": (False, dict(zarr_format=3, dtype="uint16", serializer=BytesCodec(endian="big"))),
    "zarr3-transposed": (False, dict(zarr_format=3, dtype="uint16", filters=[TransposeCodec(order=(2, 1, 0))])),
    "zarr3-crc32c": (False, dict(zarr_format=3, dtype="uint16", compressors=[Crc32cCodec()])),
    "zarr3-sharded": (False, dict(zarr_format=3, dtype="uint16", shards=(8, 8, 8))),
}  # fmt: skip


@pytest.mark.parametrize("kind", RAW_LAYOUTS)
def test_only_chunk_files_that_are_the_voxels_as_they_are_are_read_without_zarr(tmp_path, kind):
    raw, layout = RAW_LAYOUTS[kind]
    layout = {"compressors": None, "fill_value": 0, **layout}
    shape = (10, 12, 14)
    volume = (np.arange(np.prod(shape)).reshape(shape) % 250 + 1).astype(layout["dtype"])
    volume[:4, :4, :4] = 0 if layout["fill_value"] == 0 else volume[:4, :4, :4]
    zarr.create_array(tmp_path / "v.zarr", shape=shape, chunks=(4, 4, 4), **layout)[...] = volume
    cache = ChunkCache(zarr.open_array(tmp_path / "v.zarr", mode="r"), 1 << 30)
    assert cache._raw is raw
    lo, hi = np.array([-2, -2, -2]), np.array(shape) + 3
    np.testing.assert_array_equal(cache.box(lo, hi), box_of(volume.astype(cache.array.dtype), lo, hi))
