"""The second review of ppm_to_layers, decompress_tiffs and the progress display: each case it found.

Every test runs the real scripts in child processes (tests/test_fault_injection.py's wrapper stops a
run as ``kill -9`` would) and compares with references computed here.
"""

from __future__ import annotations

import numpy as np
import pytest

from scrollzarr.ppm import write_ppm

from conftest import assert_one_line_error, run_script, write_stack


@pytest.fixture(scope="module")
def volume_store(tmp_path_factory):
    """A small one-level OME-Zarr and a 4 x 3 surface through it."""
    import zarr

    root = tmp_path_factory.mktemp("review")
    store = root / "v.zarr"
    data = np.random.default_rng(11).integers(1, 60000, size=(16, 20, 24), dtype=np.uint16)
    group = zarr.open_group(store, mode="w", zarr_format=2)
    group.create_array("0", data=data, chunks=(8, 8, 8), compressors=None)
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    rng = np.random.default_rng(3)
    points = rng.uniform((3, 3, 3), (21, 17, 13), size=(4, 3, 3))
    normals = rng.normal(size=(4, 3, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    ppm = root / "s.ppm"
    write_ppm(ppm, np.concatenate([points, normals], axis=-1))
    return ppm, store


# 4. --workers is bounded alike in the three tools.


@pytest.mark.parametrize("workers", [0, 1025])
def test_workers_out_of_bounds_is_the_same_message_in_the_three_tools(tmp_path, volume_store, workers):
    ppm, store = volume_store
    write_stack(tmp_path / "slices", np.ones((2, 4, 4), np.uint16))
    results = [
        run_script("ppm_to_layers.py", ppm, store, tmp_path / "layers", "--workers", workers),
        run_script("decompress_tiffs.py", tmp_path / "slices", tmp_path / "plain", "--workers", workers),
        run_script("scroll_to_ome.py", tmp_path / "slices", tmp_path / "s.zarr", "--workers", workers),
    ]
    bound = "at least 1, not 0" if workers == 0 else "at most 1024, not 1025"
    for result in results:
        assert_one_line_error(result, f"--workers must be {bound}", code=2)
    assert not (tmp_path / "layers").exists()
