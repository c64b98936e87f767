"""ppm_to_layers --num_parts/--part_id and --merge_parts: a render in parts, rendered at once or one after the
other, killed and resumed, merged into the files of a render in one part, byte for byte.

The surface is a long .ppm along the synthetic scroll's sheet (converted by
scroll_to_ome); the single-part render is the reference, and the merged files
are compared with it by their bytes (its own correctness against the numpy
reference is tests/test_layers.py's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scrollzarr.ppm import write_ppm
from scrollzarr.synthetic import sheet_surface, write_stack

from conftest import ROOT, assert_ok, assert_one_line_error, run_script, scroll_to_ome

SHAPE = (40, 96, 112)
OPTIONS = ["--number_of_layers", "5", "--block_size", "4"]  # 480 rows: 120 bands


@pytest.fixture(scope="module")
def scroll(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parts")
    write_stack(root / "tiffs", SHAPE)
    assert_ok(scroll_to_ome(root / "tiffs", root / "scroll.zarr", "--chunk_size", 32, "--nlevels", 1, "--quiet"))
    surface = sheet_surface(SHAPE, np.tile(np.arange(SHAPE[0], dtype=np.float64), 12), 300)
    surface[100:140, 50:120] = 0
    write_ppm(root / "long.ppm", surface)
    return root


@pytest.fixture(scope="module")
def whole(scroll) -> dict[str, bytes]:
    assert_ok(ppm_to_layers(scroll, scroll / "whole", "--quiet"))
    return outputs(scroll / "whole")


def ppm_to_layers(scroll: Path, out: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return run_script(
        "ppm_to_layers.py", scroll / "long.ppm", scroll / "scroll.zarr", out / "l", out / "s.tif", *OPTIONS, *args
    )


def command(scroll: Path, out: Path, *args: object) -> list[str]:
    words = [sys.executable, ROOT / "ppm_to_layers.py", scroll / "long.ppm", scroll / "scroll.zarr", out / "l"]
    return list(map(str, [*words, out / "s.tif", *OPTIONS, *args]))


def outputs(out: Path) -> dict[str, bytes]:
    files = {path.name: path.read_bytes() for path in sorted((out / "l").glob("*.tif"))}
    return files | {"s.tif": (out / "s.tif").read_bytes()}


def test_parts_rendered_at_once_merge_into_the_single_part_render(scroll, whole, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = [
        subprocess.Popen(command(scroll, tmp_path, "--num_parts", 3, "--part_id", part), env=env, text=True,
                         stderr=subprocess.PIPE)
        for part in range(3)
    ]  # fmt: skip
    for part, process in enumerate(runs):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        assert f"part {part} of 3: surface rows" in stderr and "--merge_parts" in stderr
    heights = [tifffile.imread(tmp_path / "l" / f"00.part{part}.tif").shape[0] for part in range(3)]
    assert heights == [160, 160, 160]  # 120 bands of 4 rows, 40 a part
    assert (tmp_path / "s.part1.tif").exists()

    result = ppm_to_layers(scroll, tmp_path, "--num_parts", 3, "--merge_parts")
    assert_ok(result)
    assert "merged 3 parts into 5 layers of 300 x 480" in result.stderr and "removed the 18 part files" in result.stderr
    assert outputs(tmp_path) == whole
    assert sorted(p.name for p in (tmp_path / "l").iterdir()) == [
        ".scrollzarr-layers.json",
        *(f"0{k}.tif" for k in range(5)),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l", "s.tif"]
    record = json.loads((tmp_path / "l" / ".scrollzarr-layers.json").read_text())
    assert record["height"] == 480 and sorted(record["files"]) == [f"0{k}.tif" for k in range(5)]


def test_a_part_leaves_the_records_being_written_by_the_other_parts(scroll, whole, tmp_path):
    """The race CI once hit: part 1 deleted part 0's record while part 0 was writing it (each record is written
    to a temporary name, then renamed).  A part tidies only its own records' temporary files; the merge, holding
    every part's lock, tidies them all."""
    out = tmp_path / "l"
    out.mkdir()
    others = [out / f".scrollzarr-{kind}.part1.json.{'a' * 32}.partial" for kind in ("layers", "render")]
    own = [out / f".scrollzarr-{kind}.part0.json.{'b' * 32}.partial" for kind in ("layers", "render")]
    for path in others + own:
        path.write_text("{")
    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--part_id", 0, "--quiet"))
    assert all(path.exists() for path in others) and not any(path.exists() for path in own)

    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--part_id", 1, "--quiet"))
    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--merge_parts", "--quiet"))
    assert not any(path.exists() for path in others)
    assert outputs(tmp_path) == whole


def test_a_killed_part_resumed_then_merged_gives_the_single_part_render(scroll, tmp_path):
    """A surface five times as long, so that part 1 on one thread lasts long enough to be killed half-way."""
    surface = sheet_surface(SHAPE, np.tile(np.arange(SHAPE[0], dtype=np.float64), 60), 300)
    longer = tmp_path / "in"
    longer.mkdir()
    write_ppm(longer / "long.ppm", surface)
    (longer / "scroll.zarr").symlink_to(scroll / "scroll.zarr")
    assert_ok(ppm_to_layers(longer, tmp_path / "whole", "--quiet"))
    for part in (0, 2):
        assert_ok(ppm_to_layers(longer, tmp_path, "--num_parts", 3, "--part_id", part, "--quiet"))
    slow = command(longer, tmp_path, "--num_parts", 3, "--part_id", 1, "--workers", 1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(slow, env=env, stderr=subprocess.PIPE, text=True)
    record = tmp_path / "l" / ".scrollzarr-render.part1.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "part 1 ended before it could be killed; make the surface longer"
        try:
            if json.loads(record.read_text())["done"]:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    process.kill()
    process.communicate()

    unfinished = ppm_to_layers(longer, tmp_path, "--num_parts", 3, "--merge_parts")
    assert_one_line_error(unfinished, "part 1 of 3", "has not finished", "--part_id 1 --resume", code=1)
    resumed = ppm_to_layers(longer, tmp_path, "--num_parts", 3, "--part_id", 1, "--resume")
    assert_ok(resumed)
    assert "resumed: " in resumed.stderr
    assert_ok(ppm_to_layers(longer, tmp_path, "--num_parts", 3, "--merge_parts", "--quiet"))
    assert outputs(tmp_path) == outputs(tmp_path / "whole")


def test_merging_with_a_part_missing_or_of_another_render_is_one_line(scroll, tmp_path):
    for part in (0, 1):
        assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 3, "--part_id", part, "--quiet"))
    missing = ppm_to_layers(scroll, tmp_path, "--num_parts", 3, "--merge_parts")
    assert_one_line_error(missing, "00.part2.tif is missing", "--num_parts 3 --part_id 2", code=1)
    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 3, "--part_id", 2, "--quiet"))
    other = ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--merge_parts")
    assert_one_line_error(other, "part (number, count) [0, 3], this merge asks for [0, 2]", code=1)
    replaced = tmp_path / "l" / "03.part1.tif"
    kept = replaced.read_bytes()
    tifffile.imwrite(replaced, np.zeros((3, 3), np.uint16))  # another image under a part's name
    wrong = ppm_to_layers(scroll, tmp_path, "--num_parts", 3, "--merge_parts")
    assert_one_line_error(wrong, "03.part1.tif is not part 1's image of this render", code=1)
    replaced.write_bytes(kept)
    spacing = ppm_to_layers(scroll, tmp_path, "--num_parts", 3, "--merge_parts", "--layer_spacing", 2)
    assert_one_line_error(spacing, "part 0", "was rendered with spacing 1.0, this merge asks for 2.0", code=1)
    fewer = ppm_to_layers(scroll, tmp_path, "--num_parts", 3, "--merge_parts", "--number_of_layers", 4)
    assert_one_line_error(fewer, "was rendered with layers 5, this merge asks for 4", code=1)
    assert not any((tmp_path / "l").glob("0?.tif"))  # nothing merged, every part kept
    assert len(list((tmp_path / "l").glob("0?.part?.tif"))) == 15


def test_a_merge_does_not_replace_images_without_overwrite(scroll, whole, tmp_path):
    for part in range(2):
        assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--part_id", part, "--quiet"))
    (tmp_path / "l" / "00.tif").write_bytes(b"mine")
    refused = ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--merge_parts")
    assert_one_line_error(refused, "00.tif exists; add --overwrite", code=1)
    assert (tmp_path / "l" / "00.tif").read_bytes() == b"mine"
    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--merge_parts", "--overwrite", "--quiet"))
    assert outputs(tmp_path) == whole


def test_a_part_does_not_replace_its_own_files_without_overwrite(scroll, tmp_path):
    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--part_id", 1, "--quiet"))
    again = ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--part_id", 1)
    assert_one_line_error(again, "holds files of part 1 already", "--overwrite", code=1)
    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--part_id", 0, "--quiet"))  # another part: fine
    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--part_id", 1, "--overwrite", "--quiet"))


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--num_parts", 0], ["--num_parts must be at least 1, not 0"]),
        (["--num_parts", 3, "--part_id", 3], ["--part_id must be between 0 and --num_parts - 1 (2), not 3"]),
        (["--part_id", -1], ["--part_id must be between 0 and --num_parts - 1 (0), not -1"]),
        (["--num_parts", 121], ["--num_parts 121 is more than the render's 120 band(s) of rows; give at most 120"]),
        (["--merge_parts"], ["--merge_parts joins the parts of a render: give --num_parts"]),
        (["--merge_parts", "--num_parts", 2, "--resume"], ["--merge_parts has nothing to resume"]),
        (["--merge_parts", "--num_parts", 2, "--part_id", 1], ["--merge_parts joins every part: leave --part_id out"]),
    ],
)
def test_part_options_that_cannot_work_are_one_line(scroll, tmp_path, args, fragments):
    result = ppm_to_layers(scroll, tmp_path, *args)
    assert_one_line_error(result, *fragments, code=2)
    assert not (tmp_path / "l").exists()


def test_a_merge_stopped_while_it_removed_the_parts_is_told_as_such(scroll, whole, tmp_path):
    for part in range(2):
        assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--part_id", part, "--quiet"))
    leftover = (tmp_path / "l" / "00.part1.tif").read_bytes()
    assert_ok(ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--merge_parts", "--quiet"))
    (tmp_path / "l" / "00.part1.tif").write_bytes(leftover)  # as if the removal had stopped before this file
    again = ppm_to_layers(scroll, tmp_path, "--num_parts", 2, "--merge_parts", "--overwrite")
    assert_one_line_error(again, "00.part0.tif is missing", "holds the merged images already", code=1)
    assert {name: data for name, data in outputs(tmp_path).items() if ".part" not in name} == whole


def test_resume_without_the_part_of_a_stopped_part_names_the_parts(scroll, tmp_path):
    (tmp_path / "l").mkdir(parents=True)
    (tmp_path / "l" / ".scrollzarr-render.part1.json").write_text("{}")
    result = ppm_to_layers(scroll, tmp_path, "--resume")
    assert_one_line_error(result, "holds no stopped render", ".scrollzarr-render.part1.json", "--part_id", code=2)
