"""The stores open in the readers our users run: zarr-python 2.18 (what khartes uses) and tensorstore.

zarr 2.x cannot share an environment with zarr 3, so ``make test`` installs it into a folder of its own
and names it in ``SCROLLZARR_ZARR2_PATH``; the check runs in a separate process with that folder first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from conftest import assert_ok, scroll_to_ome, write_stack
from reference import pyramid

ZARR2 = os.environ.get("SCROLLZARR_ZARR2_PATH")

READ_WITH_ZARR2 = """
import json, sys
import numpy as np
import zarr
assert zarr.__version__.startswith("2."), zarr.__version__
group = zarr.open_group(sys.argv[1], mode="r")
datasets = group.attrs["multiscales"][0]["datasets"]
for level, dataset in enumerate(datasets):
    # khartes' rules: paths 0, 1, 2, ... in order, scale three equal values 2**level
    assert dataset["path"] == str(level), dataset
    scale = dataset["coordinateTransformations"][0]["scale"]
    assert scale == [2**level] * 3, scale
    np.save(f"{sys.argv[2]}/{level}.npy", group[dataset["path"]][:])
print(json.dumps(len(datasets)))
"""


@pytest.fixture
def converted(tmp_path, rng):
    volume = rng.integers(1, 65535, size=(40, 50, 60), dtype=np.uint16)
    volume[:, :34, :34] = 0  # whole chunks missing on disk at levels 0 and 1
    write_stack(tmp_path / "slices", volume)
    out = tmp_path / "out.zarr"
    assert_ok(scroll_to_ome(tmp_path / "slices", out, "--chunk_size", 16, "--nlevels", 4))
    return out, pyramid(volume, 4)


@pytest.mark.skipif(not ZARR2, reason="SCROLLZARR_ZARR2_PATH is not set (make test sets it)")
def test_zarr2_reads_every_level(tmp_path, converted):
    out, levels = converted
    env = dict(os.environ, PYTHONPATH=ZARR2)
    result = subprocess.run(
        [sys.executable, "-c", READ_WITH_ZARR2, out, tmp_path], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == len(levels)
    for level, expected in enumerate(levels):
        np.testing.assert_array_equal(np.load(tmp_path / f"{level}.npy"), expected)


def test_tensorstore_reads_every_level(converted):
    out, levels = converted
    for level, expected in enumerate(levels):
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(out / str(level))}}
        array = ts.open(spec, read=True).result()
        np.testing.assert_array_equal(array.read().result(), expected)
