"""OME-NGFF metadata: 0.4 (zarr 2) and 0.5 (zarr 3) written on real groups with real level arrays, checked by
ome-zarr-models, read back, removed and restored; malformed metadata refused by the tools with one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
import zarr.codecs
from ome_zarr_models.v04.image import Image as ImageV04
from ome_zarr_models.v05.image import Image as ImageV05

from scrollzarr import ngff
from scrollzarr.ngff_v04 import Dataset, Multiscale
from scrollzarr.ppm import write_ppm

from conftest import assert_ok, assert_one_line_error, read_json, run_script, scroll_to_ome, write_stack

SHAPES = ((20, 24, 28), (10, 12, 14), (5, 6, 7))  # z, y, x of levels 0, 1, 2
ORIGIN = (3, 10, 17)  # z, y, x of a crop's corner in the scan


def pyramid(origin: tuple[int, int, int] | None) -> Multiscale:
    return Multiscale.pyramid("scan", len(SHAPES), origin, "mean", {"order": 1})


def make_group(path: Path, zarr_format: int, rng: np.random.Generator) -> zarr.Group:
    """A group with one filled array per level: zarr 2 blosc-lz4 with '/' keys, or zarr 3 sharded blosc-zstd
    with dimension names (what NGFF 0.5 asks of the arrays)."""
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    for level, shape in enumerate(SHAPES):
        data = rng.integers(1, 60000, size=shape, dtype=np.uint16)
        if zarr_format == 2:
            array = group.create_array(
                str(level), shape=shape, chunks=(4, 4, 4), dtype="uint16", fill_value=0,
                compressors=numcodecs.Blosc(cname="lz4"), chunk_key_encoding={"name": "v2", "separator": "/"},
            )  # fmt: skip
        else:
            array = group.create_array(
                str(level), shape=shape, chunks=(4, 4, 4), shards=(8, 8, 8), dtype="uint16", fill_value=0,
                compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3), dimension_names=("z", "y", "x"),
            )  # fmt: skip
        array[...] = data
    return group


def expected_datasets(origin: tuple[int, int, int] | None) -> list[dict]:
    """The datasets entry the spec gives for levels of 1, 2, 4 voxels, written out by hand."""
    datasets = []
    for level in range(len(SHAPES)):
        transforms = [{"type": "scale", "scale": [2.0**level] * 3}]
        if origin is not None:
            transforms.append({"type": "translation", "translation": [float(v) for v in origin]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return datasets


AXES_JSON = [{"name": axis, "type": "space"} for axis in "zyx"]


@pytest.mark.parametrize("origin", [None, ORIGIN])
def test_zarr_2_gets_ngff_0_4_that_ome_zarr_models_accepts(tmp_path, rng, origin):
    path = tmp_path / "v.zarr"
    group = make_group(path, 2, rng)
    group.attrs.update(ngff.attributes(pyramid(origin), 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ValidationWarning is a failure too
        ImageV04.from_zarr(zarr.open_group(path, mode="r"))
    attrs = read_json(path / ".zattrs")
    assert set(attrs) == {"multiscales"}
    (entry,) = attrs["multiscales"]
    assert entry["version"] == "0.4"
    assert entry["axes"] == AXES_JSON
    assert entry["datasets"] == expected_datasets(origin)


@pytest.mark.parametrize("origin", [None, ORIGIN])
def test_zarr_3_gets_ngff_0_5_that_ome_zarr_models_accepts(tmp_path, rng, origin):
    path = tmp_path / "v.zarr"
    group = make_group(path, 3, rng)
    group.attrs.update(ngff.attributes(pyramid(origin), 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageV05.from_zarr(zarr.open_group(path, mode="r"))
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert set(attrs) == {"ome"}
    assert attrs["ome"]["version"] == "0.5"
    (entry,) = attrs["ome"]["multiscales"]
    assert "version" not in entry  # 0.5 keeps the version in "ome" only
    assert entry["axes"] == AXES_JSON
    assert entry["datasets"] == expected_datasets(origin)


def test_ome_zarr_models_refuses_0_5_levels_without_dimension_names(tmp_path, rng):
    """The check above can fail: the same metadata over arrays without dimension names is refused."""
    group = zarr.open_group(tmp_path / "v.zarr", mode="w", zarr_format=3)
    for level, shape in enumerate(SHAPES):
        group.create_array(str(level), shape=shape, chunks=(4, 4, 4), dtype="uint16")
    group.attrs.update(ngff.attributes(pyramid(None), 3))
    with pytest.raises(ValueError, match="dimension_names"):
        ImageV05.from_zarr(zarr.open_group(tmp_path / "v.zarr", mode="r"))


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("origin", [None, ORIGIN])
def test_written_metadata_reads_back_the_same(tmp_path, rng, zarr_format, origin):
    path = tmp_path / "v.zarr"
    make_group(path, zarr_format, rng).attrs.update(ngff.attributes(pyramid(origin), zarr_format))
    group = zarr.open_group(str(path), mode="r+")  # as --first_new_level opens it: the format is found
    assert group.metadata.zarr_format == zarr_format
    attrs = group.attrs.asdict()
    assert ngff.version(attrs) == {2: "0.4", 3: "0.5"}[zarr_format]
    translation = None if origin is None else tuple(float(v) for v in origin)
    expected = Multiscale(
        "scan",
        tuple(Dataset(str(level), (2.0**level,) * 3, translation) for level in range(len(SHAPES))),
        "mean",
        {"order": 1},
    )
    assert ngff.read(attrs) == expected


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_without_removes_the_multiscales_and_removed_restores_them(tmp_path, rng, zarr_format):
    path = tmp_path / "v.zarr"
    group = make_group(path, zarr_format, rng)
    group.attrs.update({"scrollzarr": {"bad_slices": []}, **ngff.attributes(pyramid(ORIGIN), zarr_format)})
    attrs = group.attrs.asdict()
    stripped = ngff.without(attrs)
    group.attrs.put(stripped)
    on_disk = zarr.open_group(str(path), mode="r").attrs.asdict()
    assert on_disk == {"scrollzarr": {"bad_slices": []}}  # 0.5: an "ome" with only its version goes too
    assert ngff.version(on_disk) is None
    assert ngff.without(on_disk) == on_disk
    saved = ngff.removed(attrs)
    assert json.loads(json.dumps(saved)) == saved  # it goes into the JSON progress record
    assert ngff.read(saved) == pyramid(ORIGIN)
    assert {**stripped, **saved} == attrs


def test_0_5_keeps_the_rest_of_ome(tmp_path, rng):
    """Other OME keys beside the multiscales stay through a removal and a rewrite."""
    group = make_group(tmp_path / "v.zarr", 3, rng)
    omero = {"channels": [{"label": "ct"}]}
    group.attrs.update({"ome": {**ngff.attributes(pyramid(None), 3)["ome"], "omero": omero}})
    stripped = ngff.without(group.attrs.asdict())
    assert stripped == {"ome": {"version": "0.5", "omero": omero}}
    rewritten = ngff.attributes(pyramid(ORIGIN), 3, stripped)
    assert rewritten["ome"]["omero"] == omero
    assert ngff.read(rewritten) == pyramid(ORIGIN)


# Malformed metadata: each refused by ppm_to_layers with one line (exit 1) naming the store and what is wrong
# (after "OME-NGFF <version> 'multiscales' ").


def _entry(zarr_format: int) -> tuple[dict, dict]:
    """Valid attributes of a one-level group, and the multiscales entry inside them (to spoil)."""
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]
    if zarr_format == 2:
        entry = {"version": "0.4", "axes": list(AXES_JSON), "datasets": datasets}
        return {"multiscales": [entry]}, entry
    entry = {"axes": list(AXES_JSON), "datasets": datasets}
    return {"ome": {"version": "0.5", "multiscales": [entry]}}, entry


def _set(key, value):
    return lambda attrs, entry: entry.__setitem__(key, value)


def _first_dataset(key, value):
    return lambda attrs, entry: entry["datasets"][0].__setitem__(key, value)


def _scale(value):
    return lambda attrs, entry: entry["datasets"][0]["coordinateTransformations"][0].__setitem__("scale", value)


MALFORMED = [
    (2, _set("axes", [{"name": a, "type": "space"} for a in "xyz"]), "has axes ['x', 'y', 'z'], not z, y, x"),
    (3, _set("axes", ["c", "z", "y", "x"]), "has axes ['c', 'z', 'y', 'x'], not z, y, x"),
    (2, _set("datasets", []), "has no list of 'datasets' (levels)"),
    (3, lambda attrs, entry: entry["datasets"][0].pop("path"), "lacks the key 'path'"),
    (3, _first_dataset("coordinateTransformations", []), "gives level '0' no 'scale' of three positive numbers"),
    (2, _scale([1.0, 0.0, 1.0]), "gives level '0' no 'scale' of three positive numbers"),
    (2, _scale(["a", 1, 1]), "is malformed (ValueError"),
    (
        3,
        lambda attrs, entry: entry["datasets"][0]["coordinateTransformations"].append(
            {"type": "translation", "translation": [1.0, 2.0]}
        ),
        "gives level '0' a 'translation' other than three numbers",
    ),
    (
        3,
        _set("coordinateTransformations", [{"type": "scale", "scale": [2.0, 2.0, 2.0]}]),
        "has transformations that apply to every level, which are not supported",
    ),
    (3, lambda attrs, entry: attrs["ome"].__setitem__("multiscales", {"0": entry}), "is not a list of entries"),
    (2, lambda attrs, entry: attrs.__setitem__("multiscales", []), "is not a list of entries"),
]  # fmt: skip


@pytest.mark.parametrize(("zarr_format", "spoil", "fragment"), MALFORMED)
def test_ppm_to_layers_refuses_malformed_metadata_in_one_line(tmp_path, zarr_format, spoil, fragment):
    path = tmp_path / "v.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    extra = {} if zarr_format == 2 else {"dimension_names": ("z", "y", "x")}
    group.create_array("0", data=np.ones((8, 8, 8), dtype=np.uint16), chunks=(8, 8, 8), **extra)
    attrs, entry = _entry(zarr_format)
    spoil(attrs, entry)
    group.attrs.put(attrs)
    write_ppm(tmp_path / "s.ppm", np.array([[[4.0, 4.0, 4.0, 0.0, 0.0, 1.0]]]))
    result = run_script("ppm_to_layers.py", tmp_path / "s.ppm", path, tmp_path / "out", "--number_of_layers", 1)
    where = f"{path}: OME-NGFF {'0.4' if zarr_format == 2 else '0.5'} 'multiscales' "
    assert_one_line_error(result, where + fragment, "give an OME-Zarr made by scroll_to_ome", code=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ppm_to_layers_names_a_group_without_multiscales(tmp_path, zarr_format):
    path = tmp_path / "v.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    group.create_array("0", data=np.ones((8, 8, 8), dtype=np.uint16), chunks=(8, 8, 8))
    group.attrs.put({"ome": {"version": "0.5"}})  # an OME group, but not an image
    write_ppm(tmp_path / "s.ppm", np.array([[[4.0, 4.0, 4.0, 0.0, 0.0, 1.0]]]))
    result = run_script("ppm_to_layers.py", tmp_path / "s.ppm", path, tmp_path / "out", "--number_of_layers", 1)
    assert_one_line_error(result, f"{path} is a zarr group without OME-Zarr 'multiscales' metadata", code=1)


# --first_new_level: reads the metadata through the same module, refuses it malformed, writes it back.


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("stack")
    write_stack(directory, np.random.default_rng(5).integers(1, 60000, size=(24, 40, 36), dtype=np.uint16))
    return directory


def test_first_new_level_refuses_malformed_metadata_in_one_line(tmp_path, stack):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", 16, "--nlevels", 2))
    attrs = read_json(out / ".zattrs")
    attrs["multiscales"][0]["axes"] = ["x", "y", "z"]
    (out / ".zattrs").write_text(json.dumps(attrs))
    result = scroll_to_ome(stack, out, "--first_new_level", 1)
    assert_one_line_error(
        result,
        f"{out} is not a finished OME-Zarr (OME-NGFF 0.4 'multiscales' has axes ['x', 'y', 'z'], not z, y, x)",
        "convert the TIFFs first",
        code=1,
    )


def test_first_new_level_writes_valid_0_4_metadata_with_the_crop(tmp_path, stack):
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(stack, out, "--chunk_size", 16, "--nlevels", 2, "--ranges", "5:30,7:40,2:20"))
    assert_ok(scroll_to_ome(stack, out, "--first_new_level", 1, "--nlevels", 3, "--algorithm", "max"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageV04.from_zarr(zarr.open_group(out, mode="r"))
    attrs = read_json(out / ".zattrs")
    assert "scrollzarr" in attrs  # the conversion's own record stays
    (entry,) = attrs["multiscales"]
    assert entry["type"] == "max"
    origin = (2, 7, 5)  # --ranges is x, y, z
    datasets = [
        {
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [2.0**level] * 3},
                {"type": "translation", "translation": [float(v) for v in origin]},
            ],
        }
        for level in range(3)
    ]
    assert entry["datasets"] == datasets


def test_attributes_that_are_not_a_dict_have_no_multiscales():
    """A progress record of a rebuild by an older scrollzarr holds the bare 0.4 list: refused, not misread."""
    entry = ngff.attributes(pyramid(None), 2)["multiscales"]
    with pytest.raises(ngff.MissingMetadata, match="no OME-Zarr 'multiscales' metadata"):
        ngff.read(entry)  # type: ignore[arg-type]
