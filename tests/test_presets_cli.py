"""``--preset`` and the layout options of scroll_to_ome: how they resolve, what --dry_run prints, every refusal."""

from __future__ import annotations

import numpy as np
import pytest

import scroll_to_ome as cli
from scrollzarr import pipeline, presets
from scrollzarr.errors import UsageError
from scrollzarr.options import Options

from conftest import assert_ok, assert_one_line_error, scroll_to_ome, store_files, write_stack

# The README's table of presets, written out here by hand.
DOCUMENTED = {
    "open-data": dict(obytes=1, chunk_size=128, nlevels=6, zarr_format=2, shard_shape=None, compressor="none"),
    "open-data-zstd": dict(
        obytes=1, chunk_size=128, nlevels=6, zarr_format=2, shard_shape=None, compressor="blosc-zstd"
    ),
    "v3-sharded": dict(
        obytes=0, chunk_size=128, nlevels=6, zarr_format=3, shard_shape=(128, 1024, 1024), compressor="blosc-zstd"
    ),
}


@pytest.fixture
def stack(tmp_path, rng):
    directory = tmp_path / "slices"
    write_stack(directory, rng.integers(1, 60000, size=(12, 30, 40), dtype=np.uint16))
    return directory


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_presets_resolve_as_documented(name):
    options = presets.resolve(name, {})
    for field, value in DOCUMENTED[name].items():
        assert getattr(options, field) == value, field
    assert options.clevel is None and options.window is None and options.preset == name


def test_an_option_beside_a_preset_wins():
    options = presets.resolve("v3-sharded", {"compressor": "gzip", "clevel": 9, "chunk_size": 64, "obytes": None})
    assert (options.compressor, options.clevel, options.chunk_size) == ("gzip", 9, 64)
    assert options.shard_shape == (128, 1024, 1024) and options.zarr_format == 3
    options = presets.resolve("open-data", {"obytes": 0, "window": None})
    assert options.obytes == 0
    options = presets.resolve("open-data", {"window": "10:20"})
    assert options.window == "10:20" and options.obytes == 1


def test_no_preset_gives_the_defaults():
    assert presets.resolve(None, {name: None for name in presets.OPTION_NAMES}) == Options()


def test_shard_shape_text():
    options = presets.resolve(None, {"zarr_format": 3, "shard_shape": " 256, 512,128", "chunk_size": 128})
    assert options.shard_shape == (256, 512, 128)


def dry_run(stack, tmp_path, *args: object) -> str:
    result = scroll_to_ome(stack, tmp_path / "out.zarr", "--dry_run", *args)
    assert_ok(result)
    assert not (tmp_path / "out.zarr").exists()
    return result.stdout


def test_dry_run_of_a_preset(stack, tmp_path):
    text = dry_run(stack, tmp_path, "--preset", "open-data")
    assert "output: " in text and "(OME-Zarr, NGFF 0.4), uint8, downsampling mean" in text
    assert "  preset open-data\n" in text
    assert "  layout: zarr 2, chunks 128^3, uncompressed\n" in text
    assert "  uint16 to uint8: value // 256 (--obytes 1)\n" in text
    assert "level 5: 1 x 1 x 2 (z, y, x), 1 chunks" in text  # 6 levels


def test_dry_run_of_an_option_beside_a_preset(stack, tmp_path):
    text = dry_run(stack, tmp_path, "--preset", "open-data-zstd", "--clevel", 7, "--window", "100:2000")
    assert "  layout: zarr 2, chunks 128^3, blosc-zstd level 7\n" in text
    assert "  uint16 to uint8: window 100:2000 (given): 100 and below to 0, 2000 and above to 255" in text
    text = dry_run(stack, tmp_path, "--preset", "open-data", "--obytes", 0, "--nlevels", 2)
    assert "(OME-Zarr, NGFF 0.4), uint16, downsampling mean" in text and "uint16 to uint8" not in text
    assert "level 2:" not in text


def test_dry_run_of_zarr_3(stack, tmp_path):
    text = dry_run(stack, tmp_path, "--preset", "v3-sharded")
    assert "(OME-Zarr, NGFF 0.5), uint16" in text
    assert "  layout: zarr 3, chunks 128^3, shards 128 x 1024 x 1024 (z, y, x), blosc-zstd level 3\n" in text
    text = dry_run(stack, tmp_path, "--zarr-format", 3, "--chunk-size", 8, "--shard-shape", "16,8,24")
    assert "  layout: zarr 3, chunks 8^3, shards 16 x 8 x 24 (z, y, x), uncompressed\n" in text


def test_dry_run_of_the_defaults(stack, tmp_path):
    text = dry_run(stack, tmp_path)
    assert "(OME-Zarr, NGFF 0.4), uint16, downsampling mean" in text
    assert "preset" not in text
    assert "  layout: zarr 2, chunks 128^3, uncompressed\n" in text


def test_the_fingerprint_holds_the_layout_and_the_window(stack, tmp_path):
    options = presets.resolve("open-data-zstd", {"clevel": 5, "window": "10:50000"})
    fingerprint = pipeline.plan_conversion(stack, tmp_path / "o.zarr", options).fingerprint
    assert fingerprint["zarr_format"] == 2 and fingerprint["shard_shape"] is None
    assert fingerprint["compressor"] == "blosc-zstd" and fingerprint["clevel"] == 5
    assert fingerprint["window"] == [10, 50000]
    options = presets.resolve("v3-sharded", {})
    fingerprint = pipeline.plan_conversion(stack, tmp_path / "o.zarr", options).fingerprint
    assert fingerprint["shard_shape"] == [128, 1024, 1024] and fingerprint["clevel"] == 3
    assert fingerprint["window"] is None


REFUSED = [
    (["--shard_shape", "128,128,128"], "--shard_shape needs --zarr_format 3: zarr format 2 has no shards"),
    (["--zarr_format", "3", "--shard_shape", "100,128,128"], "--shard_shape 100,128,128 must be whole chunks"),
    (["--zarr_format", "3", "--shard_shape", "abc"], "--shard_shape must be three whole numbers Z,Y,X (voxels)"),
    (["--zarr_format", "3", "--shard_shape", "128,128"], "not '128,128'"),
    (["--zarr_format", "3", "--shard_shape=-128,128,128"], "--shard_shape must be three whole numbers"),
    (["--zarr_format", "4"], "--zarr_format must be 2 or 3, not 4"),
    (["--compressor", "lz4"], "--compressor must be one of none, blosc-zstd, blosc-lz4, zstd, gzip, not 'lz4'"),
    (["--clevel", "5"], "--clevel sets the compression level: give it with --compressor"),
    (["--compressor", "gzip", "--clevel", "12"], "--clevel for gzip must be from 0 to 9, not 12"),
    (["--preset", "openData"], "--preset must be one of open-data, open-data-zstd, v3-sharded, not 'openData'"),
    (["--preset", "v3-sharded", "--zarr_format", "2"], "--preset v3-sharded writes shards, which zarr format 2"),
    (["--preset", "v3-sharded", "--chunk_size", "256"], "must be whole chunks"),
    (["--window", "100:200"], "--window sets how uint16 becomes uint8: give it with --obytes 1"),
    (["--preset", "v3-sharded", "--window", "auto"], "--window sets how uint16 becomes uint8"),
    (["--preset", "open-data", "--obytes", "0", "--window", "1:2"], "--window sets how uint16 becomes uint8"),
    (["--obytes", "1", "--window", "300:200"], "--window 300:200: LOW must be below HIGH"),
    (["--obytes", "1", "--window", "5:5"], "--window 5:5: LOW must be below HIGH"),
    (["--obytes", "1", "--window", "0:65536"], "values are uint16, from 0 to 65535"),
    (["--obytes", "1", "--window", "dark"], "--window must be LOW:HIGH"),
]


@pytest.mark.parametrize("args,message", REFUSED)
def test_bad_combinations_are_one_line_and_exit_2(stack, tmp_path, capsys, args, message):
    out = tmp_path / "out.zarr"
    for dry in ([], ["--dry_run"]):
        assert cli.main([str(stack), str(out), *args, *dry]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("scroll_to_ome: error: ") and message in err, err
        assert not out.exists()


def test_a_refusal_from_the_real_script(stack, tmp_path):
    result = scroll_to_ome(stack, tmp_path / "out.zarr", "--preset", "nope")
    assert_one_line_error(result, "--preset must be one of", code=2)
    result = scroll_to_ome(stack, tmp_path / "out.zarr", "--clevel", "high")
    assert_one_line_error(result, "argument --clevel: invalid int value: 'high'", code=2)


@pytest.mark.parametrize(
    "args,name",
    [
        (["--preset", "open-data"], "--preset"),
        (["--zarr_format", "3"], "--zarr_format"),
        (["--zarr_format", "3", "--shard_shape", "128,128,128"], "--zarr_format"),
        (["--compressor", "zstd"], "--compressor"),
        (["--compressor", "zstd", "--clevel", "1"], "--compressor"),
        (["--obytes", "1", "--window", "auto"], "--window"),
        (["--zarr_format", "2"], "--zarr_format"),  # given at all, even with the default: the store's is kept
        (["--shard_shape", "128,128,128"], "--shard_shape"),  # not "needs --zarr_format 3"
        (["--window", "auto"], "--window"),  # not "give it with --obytes 1"
    ],
)
def test_first_new_level_refuses_the_layout_options(stack, tmp_path, args, name):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", 8, "--nlevels", 2))
    before = store_files(out)
    for dry in ([], ["--dry_run"]):
        result = scroll_to_ome(stack, out, "--first_new_level", 2, "--nlevels", 3, *args, *dry)
        assert_one_line_error(
            result, f"{name} applies when converting TIFFs; new levels keep the layout of the level above", code=2
        )
    assert store_files(out) == before


def test_resolve_refuses_an_unknown_preset():
    with pytest.raises(UsageError, match="--preset must be one of"):
        presets.resolve("published", {})
