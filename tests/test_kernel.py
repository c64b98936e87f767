"""The compiled sampling kernel (scrollzarr.kernel) gives the numpy kernel's samples bit for bit, both agree
with the independent trilinear reference, and a render takes the compiled one from COMPILED_SAMPLES on."""

from __future__ import annotations

import numpy as np
import pytest

from scrollzarr import kernel, layers, sampling
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


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("halves", [False, True])
def test_the_compiled_kernel_gives_the_numpy_kernels_samples_bit_for_bit(rng, dtype, halves):
    shape = (37, 41, 53)
    volume = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    count = 5000
    positions = np.stack([rng.uniform(-6, n + 6, count) for n in shape])  # inside, at and beyond every face
    if halves:  # exact halves and whole voxels: ties in the rounding, fractions of 0
        positions = np.round(positions * 2) / 2
    normals = rng.normal(size=(3, count))
    normals /= np.linalg.norm(normals, axis=0)
    offsets = np.arange(13, dtype=np.float64) * 0.75 - 4.5
    lo, hi = sampling.sample_bounds(positions, normals, offsets, shape)
    box = box_of(volume, lo, hi)
    numpy_out = np.empty((13, count), dtype)
    compiled_out = np.empty((13, count), dtype)
    sampling.sample_layers(box, lo, positions, normals, offsets, shape, numpy_out)
    kernel.sample_layers(box, lo, positions, normals, offsets, shape, compiled_out)
    np.testing.assert_array_equal(compiled_out, numpy_out)
    for k, t in enumerate(offsets):
        exact = trilinear(volume, positions + t * normals)
        assert np.abs(compiled_out[k] - exact).max() < 0.51  # rounded, after float32 arithmetic


def test_a_render_from_compiled_samples_on_takes_the_compiled_kernel_and_writes_the_same_files(tmp_path, monkeypatch):
    shape = (24, 64, 72)
    write_stack(tmp_path / "tiffs", shape)
    assert_ok(scroll_to_ome(tmp_path / "tiffs", tmp_path / "s.zarr", "--chunk_size", 16, "--nlevels", 1, "--quiet"))
    write_ppm(tmp_path / "sheet.ppm", sheet_surface(shape, np.arange(shape[0], dtype=np.float64), 100))
    options = LayerOptions(layers=9, workers=2, quiet=True)
    used: list[str] = []
    made = layers._Sampler.__init__

    def noting(self, job):
        made(self, job)
        used.append(self.kernel.__module__)

    monkeypatch.setattr(layers._Sampler, "__init__", noting)
    for name, threshold in (("numpy", 1 << 62), ("compiled", 0)):
        monkeypatch.setattr(layers, "COMPILED_SAMPLES", threshold)
        layers.ppm_to_layers(
            tmp_path / "sheet.ppm", tmp_path / "s.zarr", tmp_path / name, tmp_path / f"{name}.tif", options
        )
    assert used == ["scrollzarr.sampling", "scrollzarr.kernel"]
    files = sorted(path.name for path in (tmp_path / "numpy").glob("*.tif"))
    assert len(files) == 9
    for file in files:
        assert (tmp_path / "numpy" / file).read_bytes() == (tmp_path / "compiled" / file).read_bytes()
    assert (tmp_path / "numpy.tif").read_bytes() == (tmp_path / "compiled.tif").read_bytes()
