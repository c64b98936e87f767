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
