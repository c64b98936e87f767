"""The synthetic scroll generator that the demo, tests and benchmarks use."""

import numpy as np
import tifffile

from scrollzarr.synthetic import AIR_LEVEL, SHEET_LEVEL, scroll_slice

from conftest import assert_ok, run_script


def test_cli_writes_numbered_uint16_slices(tmp_path):
    result = run_script("-m", "scrollzarr.synthetic", tmp_path / "s", "--shape", 5, 40, 48, "--quiet")
    assert_ok(result)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [f"{z:05d}.tif" for z in range(5)]
    with tifffile.TiffFile(tmp_path / "s" / "00003.tif") as tif:
        page = tif.pages.first
        assert page.shape == (40, 48) and page.dtype == np.uint16 and page.compression == 1
        np.testing.assert_array_equal(page.asarray(), scroll_slice(3, (40, 48), 5, masked=False))


def test_masked_variant_is_compressed_and_zero_outside_the_scroll(tmp_path):
    assert_ok(run_script("-m", "scrollzarr.synthetic", tmp_path / "m", "--shape", 3, 64, 64, "--masked", "--quiet"))
    with tifffile.TiffFile(tmp_path / "m" / "00001.tif") as tif:
        image = tif.pages.first.asarray()
        assert tif.pages.first.compression == 8  # deflate
    assert image[0, 0] == 0 and image[-1, -1] == 0  # the corners are outside the round scroll
    assert (image > 0).mean() > 0.4


def test_sheet_is_brighter_than_air_and_seed_changes_noise():
    image = scroll_slice(0, (128, 128), 10, masked=False)
    assert np.percentile(image, 99) > (SHEET_LEVEL + AIR_LEVEL) / 2 > np.median(image)
    assert not np.array_equal(image, scroll_slice(0, (128, 128), 10, masked=False, seed=1))
    np.testing.assert_array_equal(image, scroll_slice(0, (128, 128), 10, masked=False))


def test_bad_shape_is_one_line_error(tmp_path):
    result = run_script("-m", "scrollzarr.synthetic", tmp_path / "x", "--shape", 0, 4, 4)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("--shape needs three positive sizes, not [0, 4, 4]")


def test_cli_seed_changes_the_noise(tmp_path):
    assert_ok(run_script("-m", "scrollzarr.synthetic", tmp_path / "s", "--shape", 2, 16, 16, "--seed", 3, "--quiet"))
    image = tifffile.imread(tmp_path / "s" / "00001.tif")
    np.testing.assert_array_equal(image, scroll_slice(1, (16, 16), 2, masked=False, seed=3))
    assert not np.array_equal(image, scroll_slice(1, (16, 16), 2, masked=False, seed=0))


def test_ppm_follows_the_sheet(tmp_path):
    """The .ppm is read here by hand: header lines, then float64 (x, y, z, nx, ny, nz) per pixel."""
    shape = (6, 96, 112)
    result = run_script("-m", "scrollzarr.synthetic", tmp_path / "s", "--shape", *shape, "--ppm", tmp_path / "s.ppm")
    assert_ok(result)
    raw = (tmp_path / "s.ppm").read_bytes()
    end = raw.index(b"<>\n")
    fields = dict(line.split(": ") for line in raw[:end].decode().splitlines())
    assert fields["height"] == "6" and fields["dim"] == "6" and fields["type"] == "double"
    width = int(fields["width"])
    surface = np.frombuffer(raw[end + 3 :], dtype="<f8").reshape(6, width, 6)
    assert width > 300 and np.all(np.any(surface[..., 3:] != 0, axis=-1))  # every pixel mapped
    np.testing.assert_allclose(np.linalg.norm(surface[..., 3:], axis=-1), 1.0)
    np.testing.assert_array_equal(surface[..., 2], np.arange(6)[:, None] * np.ones(width))
    for z in range(6):
        image = tifffile.imread(tmp_path / "s" / f"{z:05d}.tif")
        x, y = np.rint(surface[z, :, 0]).astype(int), np.rint(surface[z, :, 1]).astype(int)
        on = image[y, x].mean()
        off = image[np.rint(y + 3 * surface[z, :, 4]).astype(int), np.rint(x + 3 * surface[z, :, 3]).astype(int)].mean()
        assert on > 0.8 * SHEET_LEVEL and off < 0.3 * SHEET_LEVEL
