"""ppm_to_layers renders tifxyz surfaces (VC3D's folders) as the README defines them.

Sheets of known geometry (a tilted plane, a cylinder) are written as tifxyz
folders; their output pixels and normals are known in closed form, and the
layers are checked against the independent trilinear reference.  Holes, masks
and odd grids are checked against a pixel-by-pixel reference of the same
definition (tests/reference.py).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from scrollzarr.ppm import write_ppm

from conftest import assert_ok, assert_one_line_error, run_script, scroll_to_ome, write_stack
from reference import layers_reference, tifxyz_reference

SHAPE = (48, 80, 80)  # z, y, x


def ppm_to_layers(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("ppm_to_layers.py", *args)


@pytest.fixture(scope="module")
def scroll(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A smooth volume with structure along every axis, as an OME-Zarr (chunks of 16)."""
    root = tmp_path_factory.mktemp("tifxyz")
    z, y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]].astype(np.float64)
    volume = 20000 + 9000 * np.sin(z / 5) * np.cos(y / 7) + 4000 * np.sin(x / 6 + z / 11) + 40 * x
    volume = np.rint(volume).astype(np.uint16)
    write_stack(root / "tiffs", volume)
    assert_ok(scroll_to_ome(root / "tiffs", root / "scroll.zarr", "--chunk_size", 16, "--nlevels", 2, "--quiet"))
    np.testing.assert_array_equal(zarr.open_array(str(root / "scroll.zarr" / "0"), mode="r")[:], volume)
    return root / "scroll.zarr", volume


def write_tifxyz(
    folder: Path, points: np.ndarray, scale: tuple[float, float], mask: np.ndarray | None = None, **types
) -> Path:
    """A tifxyz folder as VC3D writes it: x, y, z images (float32 and tiled unless ``types`` says otherwise)."""
    folder.mkdir(parents=True)
    for axis, name in enumerate("xyz"):
        dtype = types.get(name, np.float32)
        tile = None if name in types else (16, 16)
        tifffile.imwrite(folder / f"{name}.tif", points[..., axis].astype(dtype), tile=tile, compression="lzw")
    if mask is not None:
        tifffile.imwrite(folder / "mask.tif", mask)
    meta = {"format": "tifxyz", "type": "seg", "uuid": folder.name, "scale": list(scale)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def read_layers(directory: Path, count: int) -> np.ndarray:
    return np.stack([tifffile.imread(directory / f"{k:02d}.tif") for k in range(count)])


def as_surface(positions: np.ndarray, normals: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    """A .ppm-like (H, W, 6) array: unmapped pixels with a zero normal."""
    return np.concatenate([positions, np.where(mapped[..., None], normals, 0.0)], axis=-1)


def assert_matches(layers: np.ndarray, reference: np.ndarray) -> None:
    difference = np.abs(layers.astype(np.float64) - reference)
    assert difference.max() < 0.6, difference.max()


def test_a_plane_grid_is_upsampled_to_the_plane_and_its_normal(scroll, tmp_path):
    """A tilted plane with a grid point every 4 voxels, rendered at 1 pixel per voxel: pixel (r, c) is the
    plane's point origin + c a + r b, and its normal a x b; the outermost pixels are unmapped."""
    store, volume = scroll
    a = np.array([0.8, 0.6, 0.0])  # unit, along the grid's columns (x, y, z)
    b = np.array([0.0, 0.0, 1.0])  # unit, along its rows
    origin = np.array([12.0, 20.0, 6.0])
    rows, cols = np.mgrid[0:10, 0:12]
    grid = origin + 4.0 * cols[..., None] * a + 4.0 * rows[..., None] * b
    folder = write_tifxyz(tmp_path / "plane", grid, (0.25, 0.25))
    assert_ok(ppm_to_layers(folder, store, tmp_path / "layers", "--number_of_layers", 5, "--quiet"))
    layers = read_layers(tmp_path / "layers", 5)
    r, c = np.mgrid[0:37, 0:45]  # 9 cells x 4 + 1, 11 x 4 + 1
    assert layers.shape == (5, 37, 45)
    positions = origin + c[..., None] * a + r[..., None] * b
    mapped = np.zeros((37, 45), bool)
    mapped[1:-1, 1:-1] = True
    normals = np.broadcast_to(np.cross(a, b), (37, 45, 3))
    assert_matches(layers, layers_reference(volume, as_surface(positions, normals, mapped), 5, 1.0))
    assert not layers[:, ~mapped].any() and layers[:, mapped].all()


def test_a_cylinder_at_the_grids_own_scale_has_radial_normals(scroll, tmp_path):
    """Grid points on a cylinder about an axis along z, one per pixel (meta.json scale 1, --scale 1): pixel
    (r, c) is grid point (r, c) and its normal points away from the axis."""
    store, volume = scroll
    radius, centre, step = 25.0, (40.0, 40.0), 0.04  # radians between columns: about one voxel apart
    rows, cols = np.mgrid[0:40, 0:60]
    angle = 0.5 + step * cols
    grid = np.stack([centre[0] + radius * np.cos(angle), centre[1] + radius * np.sin(angle), 4.0 + rows], axis=-1)
    folder = write_tifxyz(tmp_path / "cylinder", grid, (1.0, 1.0))
    options = ["--number_of_layers", 7, "--layer_spacing", 2.0, "--quiet"]
    assert_ok(ppm_to_layers(folder, store, tmp_path / "layers", tmp_path / "stack.tif", *options))
    layers = read_layers(tmp_path / "layers", 7)
    normals = np.stack([np.cos(angle), np.sin(angle), np.zeros_like(angle)], axis=-1)
    mapped = np.zeros(grid.shape[:2], bool)
    mapped[1:-1, 1:-1] = True
    assert_matches(layers, layers_reference(volume, as_surface(grid, normals, mapped), 7, 2.0))
    # --flip_normals turns them round: the layers come in the other order
    flipped = tmp_path / "flipped"
    assert_ok(ppm_to_layers(folder, store, flipped, *options, "--flip_normals"))
    np.testing.assert_array_equal(read_layers(flipped, 7), layers[::-1])
    assert_ok(ppm_to_layers(folder, store, tmp_path / "dashed", *options, "--flip-normals"))
    np.testing.assert_array_equal(read_layers(tmp_path / "dashed", 7), layers[::-1])


def holey_grid(spacing: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """A wavy sheet, grid points about ``spacing`` voxels apart, with every kind of invalid point, and a mask of
    twice the grid's size."""
    rows, cols = np.mgrid[0:14, 0:17].astype(np.float64)
    x, y = 6 + spacing * cols, 8 + 1.125 * spacing * rows
    grid = np.stack([x, y, 20 + 3 * np.sin(cols / 3) + 2 * np.cos(rows / 4)], axis=-1)
    grid[3:5, 4:7] = -1  # VC's invalid point
    grid[9, 12, 2] = 0.0  # z <= 0
    grid[11, 3, 0] = np.nan
    mask = np.full((28, 34), 255, np.uint8)
    mask[14:18, 20:26] = 0  # grid points (7-8, 10-12)
    mask[5, 7] = 100  # one pixel of point (2, 3)'s block: the point is masked
    return grid, mask


def mask_valid(mask: np.ndarray) -> np.ndarray:
    """The points a mask of twice the grid's size leaves valid: those whose 2 x 2 pixels are all 255."""
    return (mask[0::2, 0::2] == 255) & (mask[1::2, 0::2] == 255) & (mask[0::2, 1::2] == 255) & (mask[1::2, 1::2] == 255)


@pytest.mark.parametrize(
    ("scale", "grid_scale", "spacing"), [(1.0, (0.25, 0.2), 4.0), (0.5, (0.25, 0.25), 4.0), (1.0, (1.0, 1.0), 1.0)]
)
def test_holes_masks_and_odd_grids_render_as_the_definition_says(scroll, tmp_path, scale, grid_scale, spacing):
    store, volume = scroll
    grid, mask = holey_grid(spacing)
    folder = write_tifxyz(tmp_path / "holey", grid, grid_scale, mask)
    options = ["--number_of_layers", 3, "--layer_spacing", 1.5, "--quiet"]
    if scale != 1.0:
        options += ["--scale", scale]
    assert_ok(ppm_to_layers(folder, store, tmp_path / "layers", *options))
    valid = np.isfinite(grid).all(axis=-1) & (grid[..., 2] > 0) & ~(grid == -1).all(axis=-1)
    valid &= mask_valid(mask)
    positions, normals, mapped = tifxyz_reference(grid.astype(np.float32).astype(np.float64), valid, grid_scale, scale)
    layers = read_layers(tmp_path / "layers", 3)
    assert layers.shape[1:] == mapped.shape
    assert_matches(layers, layers_reference(volume, as_surface(positions, normals, mapped), 3, 1.5))
    assert not layers[:, ~mapped].any()
    assert mapped.sum() > 0.5 * mapped.size  # the holes are holes, not the whole surface


def test_a_tifxyz_and_a_ppm_of_the_same_points_and_normals_render_the_same_files(scroll, tmp_path):
    """At the grid's own scale, output pixel (r, c) is grid point (r, c): a .ppm holding those points and the
    normals the definition gives them renders the same TIFFs, byte for byte.  Integer coordinate images too."""
    store, _ = scroll
    grid, mask = holey_grid()
    rows, cols = np.mgrid[0:14, 0:17]
    grid = np.where(np.isnan(grid) | (grid == -1), grid, np.stack([10 + 2 * cols, 12 + 2 * rows, grid[..., 2]], -1))
    grid = np.rint(np.nan_to_num(grid, nan=-1))  # whole voxels, so that integer images hold them exactly
    grid[grid[..., 2] <= 0] = -1
    folder = write_tifxyz(tmp_path / "sheet", grid, (1.0, 1.0), mask, x=np.int32, y=np.float64, z=np.int16)
    valid = ~(grid == -1).all(axis=-1) & mask_valid(mask)
    positions, normals, mapped = tifxyz_reference(grid, valid, (1.0, 1.0), 1.0)
    write_ppm(tmp_path / "sheet.ppm", as_surface(positions, normals, mapped))
    options = ["--number_of_layers", 5, "--quiet"]
    assert_ok(ppm_to_layers(folder, store, tmp_path / "from_tifxyz", tmp_path / "a.tif", *options))
    assert_ok(ppm_to_layers(tmp_path / "sheet.ppm", store, tmp_path / "from_ppm", tmp_path / "b.tif", *options))
    for k in range(5):
        name = f"{k:02d}.tif"
        assert (tmp_path / "from_tifxyz" / name).read_bytes() == (tmp_path / "from_ppm" / name).read_bytes()
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()


def test_a_cluster_renders_a_tifxyz_as_this_machine_does(scroll, tmp_path):
    pytest.importorskip("distributed")
    store, _ = scroll
    grid, mask = holey_grid()
    folder = write_tifxyz(tmp_path / "holey", grid, (0.25, 0.25), mask)
    options = ["--number_of_layers", 3, "--block_size", 8, "--quiet"]
    assert_ok(ppm_to_layers(folder, store, tmp_path / "here", *options))
    assert_ok(ppm_to_layers(folder, store, tmp_path / "there", *options, "--scheduler", "local:2"))
    for k in range(3):
        name = f"{k:02d}.tif"
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes()


def broken(tmp_path: Path, change) -> Path:
    grid, mask = holey_grid()
    folder = write_tifxyz(tmp_path / "surface", grid, (0.25, 0.25), mask)
    change(folder)
    return folder


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (
            lambda f: (f / "meta.json").unlink(),
            ["a folder without meta.json; a surface is a .ppm file or a tifxyz folder"],
        ),
        (lambda f: (f / "meta.json").write_text("{"), ["meta.json: cannot be read as JSON"]),
        (lambda f: (f / "meta.json").write_text('{"scale": [0, 1]}'), ["'scale' must be two positive numbers"]),
        (lambda f: (f / "meta.json").write_text('{"format": "obj", "scale": [1, 1]}'), ["not a tifxyz surface's"]),
        (lambda f: (f / "meta.json").write_text("[1, 2]"), ["not a tifxyz surface's (a JSON object with 'scale'"]),
        (lambda f: (f / "meta.json").write_text('{"scale": [true, true]}'), ["'scale' must be two positive numbers"]),
        (
            lambda f: (f / "meta.json").write_text('{"scale": [1' + "0" * 400 + ", 1]}"),
            ["'scale' must be two positive numbers", "..."],
        ),
        (lambda f: (f / "meta.json").write_text('{"scale": [5e-324, 1]}'), ["pixels along an axis", "smaller --scale"]),
        (lambda f: (f / "y.tif").unlink(), ["no y.tif; a tifxyz surface folder has"]),
        (lambda f: (f / "z.tif").write_bytes(b"not a tiff"), ["z.tif: cannot be read as a TIFF"]),
        (lambda f: tifffile.imwrite(f / "x.tif", np.zeros((3, 3), np.float32)), ["differ in size"]),
        (lambda f: tifffile.imwrite(f / "mask.tif", np.zeros((5, 5), np.uint8)), ["not the grid's size (14 x 17)"]),
        (lambda f: tifffile.imwrite(f / "mask.tif", np.zeros((14, 17), np.uint8)), ["no grid point is valid"]),
        (
            lambda f: [tifffile.imwrite(f / f"{n}.tif", np.zeros((1, 17), np.float32)) for n in "xyz"],
            ["the grid is 1 x 17 points; a surface needs at least 2 x 2"],
        ),
        (
            lambda f: tifffile.imwrite(f / "x.tif", np.zeros((14, 17), np.complex64)),
            ["a coordinate image must be one 2-D plane of numbers"],
        ),
    ],
)
def test_a_broken_tifxyz_folder_is_one_line(scroll, tmp_path, change, fragments):
    store, _ = scroll
    folder = broken(tmp_path, change)
    result = ppm_to_layers(folder, store, tmp_path / "layers")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "layers").exists()


def test_scale_and_output_paths_that_cannot_be_used_are_one_line(scroll, tmp_path):
    store, _ = scroll
    folder = broken(tmp_path, lambda f: None)
    write_ppm(tmp_path / "s.ppm", np.zeros((2, 2, 6)))
    cases = [
        (
            [tmp_path / "s.ppm", store, tmp_path / "a", "--scale", 2],
            ["--scale is for tifxyz surfaces", "leave --scale out"],
            2,
        ),
        ([folder, store, tmp_path / "b", "--scale", 0], ["--scale must be a positive number", "not 0.0"], 2),
        ([folder, store, tmp_path / "c", "--scale", "nan"], ["--scale must be a positive number", "not nan"], 2),
        ([folder, store, tmp_path / "d", "--scale", 1e8], ["pixels along an axis", "give a smaller --scale"], 1),
        ([folder, store, tmp_path / "f", "--scale", 1e308], ["pixels along an axis", "give a smaller --scale"], 1),
        ([folder, store, tmp_path / "e", folder / "x.tif"], ["is a file of the tifxyz surface"], 1),
    ]
    for args, fragments, code in cases:
        result = ppm_to_layers(*args)
        assert_one_line_error(result, *fragments, code=code)
    assert tifffile.imread(folder / "x.tif").shape == (14, 17)  # untouched


def test_the_layers_may_be_written_into_the_surfaces_own_folder(scroll, tmp_path):
    """VC3D users keep a segment's renders beside it: the surface's files are kept."""
    store, _ = scroll
    folder = broken(tmp_path, lambda f: None)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert_ok(ppm_to_layers(folder, store, folder, "--number_of_layers", 3, "--overwrite", "--quiet"))
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.name in before} == before
    assert all((folder / f"{k:02d}.tif").exists() for k in range(3))
    assert math.isfinite(float(tifffile.imread(folder / "01.tif").mean()))


def test_a_stacked_image_onto_a_surface_file_behind_a_link_is_refused(scroll, tmp_path):
    """The surface's x.tif a link to a file elsewhere: a stacked image written to that file would replace it."""
    store, _ = scroll
    folder = broken(tmp_path, lambda f: None)
    data = tmp_path / "data"
    data.mkdir()
    (folder / "x.tif").rename(data / "x.tif")
    (folder / "x.tif").symlink_to(data / "x.tif")
    before = (data / "x.tif").read_bytes()
    result = ppm_to_layers(folder, store, tmp_path / "l", data / "x.tif", "--overwrite")
    assert_one_line_error(result, "is a file of the tifxyz surface", code=1)
    assert (data / "x.tif").read_bytes() == before


def test_first_pages_a_byte_order_mark_and_a_mask_stored_with_an_image(scroll, tmp_path):
    """VC3D may keep an image as a second page of mask.tif; meta.json may start with a BOM; each coordinate
    image's first page is read: the same render as the plain folder's."""
    store, _ = scroll
    grid, mask = holey_grid()
    plain = write_tifxyz(tmp_path / "plain", grid, (0.25, 0.25), mask)
    odd = write_tifxyz(tmp_path / "odd", grid, (0.25, 0.25))
    tifffile.imwrite(odd / "mask.tif", np.stack([mask, np.zeros_like(mask)]))  # two pages
    tifffile.imwrite(odd / "x.tif", np.stack([grid[..., 0], np.zeros(grid.shape[:2])]).astype(np.float32))
    (odd / "meta.json").write_text("\ufeff" + (odd / "meta.json").read_text(), encoding="utf-8")
    options = ["--number_of_layers", 3, "--quiet"]
    assert_ok(ppm_to_layers(plain, store, tmp_path / "a", *options))
    assert_ok(ppm_to_layers(odd, store, tmp_path / "b", *options))
    for k in range(3):
        assert (tmp_path / "a" / f"{k:02d}.tif").read_bytes() == (tmp_path / "b" / f"{k:02d}.tif").read_bytes()


def test_a_surface_with_no_mapped_pixel_is_rendered_with_a_warning(scroll, tmp_path):
    """One valid cell of 2 x 2 points: its four output pixels are the outermost, so none has a normal."""
    store, _ = scroll
    grid = np.full((4, 4, 3), -1.0)
    grid[1:3, 1:3] = [[[10, 10, 10], [11, 10, 10]], [[10, 11, 10], [11, 11, 10]]]
    folder = write_tifxyz(tmp_path / "tiny", grid, (1.0, 1.0))
    result = ppm_to_layers(folder, store, tmp_path / "l", "--number_of_layers", 1)
    assert_ok(result)
    assert "ppm_to_layers: no pixel of the surface" in result.stderr and "every layer is 0" in result.stderr
    assert not tifffile.imread(tmp_path / "l" / "00.tif").any()
