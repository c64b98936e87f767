"""scroll_to_ome to an S3 bucket: the store put in the bucket is the local run's, object for object, byte for byte.

The bucket is real S3 protocol: moto's server mode (``ThreadedMotoServer``)
started here on a free port, reached by the runs through ``AWS_ENDPOINT_URL``
and the credentials in their environment (as botocore reads them), and by the
test through its own s3fs client.  Every store is compared with the local run
of the same input (every object's bytes with the local file of the same
name), and read back from the bucket with zarr's FsspecStore, every level
against the local store and an independent pyramid.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import ROOT, assert_ok, assert_one_line_error, store_files, write_stack
from reference import pyramid

pytest.importorskip("distributed")
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

CHUNK = 16
LEVELS = 3
# several tasks per level (as in tests/test_cluster.py)
SMALL = ("--max_gb", "0.0004")
LAYOUTS = {
    "zarr 2": (),
    "zarr 3, sharded, blosc-zstd": ("--zarr_format", "3", "--shard_shape", "16,32,32", "--compressor", "blosc-zstd"),
}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Bucket:
    """A moto server of this test module, and what reaches it: the runs' environment, and an s3fs client."""

    def __init__(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}
        self.options = {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}
        self.fs = s3fs.S3FileSystem(**self.options, use_listings_cache=False, skip_instance_cache=True)

    def new(self) -> str:
        """A new, empty bucket's name."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return name

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``bucket/prefix`` by key relative to it, with its bytes."""
        return {key[len(prefix) + 1 :]: self.fs.cat_file(key) for key in self.fs.find(prefix)}

    def group(self, url: str) -> zarr.Group:
        """The store at ``url``, opened by zarr through its own fsspec store, read-only."""
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(url, storage_options=self.options, read_only=True)
        return zarr.open_group(store, mode="r")


@pytest.fixture(scope="module")
def bucket() -> Iterator[Bucket]:
    started = Bucket()
    yield started
    started.server.stop()


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """A scroll-like volume: a bright sheet in a masked (zero) cylinder, uint16, odd sizes."""
    z, y, x = np.mgrid[0:75, 0:90, 0:70]
    inside = (y - 45) ** 2 + (x - 35) ** 2 < 40**2
    values = (1000 + 37 * z + 11 * y + 5 * x + 3000 * (np.abs(y - 45 - 0.3 * z) < 4)) % 65536
    return np.where(inside, values, 0).astype(np.uint16)


@pytest.fixture(scope="module")
def slices(volume: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("s3") / "slices"
    write_stack(directory, volume, compression="zlib")
    return directory


def run(
    bucket: Bucket, slices: Path, out: str | Path, *args: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """scroll_to_ome with the bucket's endpoint and credentials in its environment (``env`` added; its
    ``PYTHONPATH`` goes before the checkout's)."""
    return subprocess.run(
        command(slices, out, *args), capture_output=True, text=True, env=environment(bucket, env), timeout=600
    )


def command(slices: Path, out: str | Path, *args: object) -> list[str]:
    return [sys.executable, str(ROOT / "scroll_to_ome.py"), str(slices), str(out), "--chunk_size", str(CHUNK),
            "--nlevels", str(LEVELS), *map(str, args)]  # fmt: skip


def environment(bucket: Bucket, env: dict[str, str] | None = None) -> dict[str, str]:
    extra = dict(env or {})
    path = os.pathsep.join([*filter(None, [extra.pop("PYTHONPATH", None)]), str(ROOT)])
    return {**os.environ, **bucket.env, **extra, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def local_stores(bucket: Bucket, slices: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The local run's store for each layout (without --scheduler: the streaming path), named ``s.zarr`` as in
    the bucket (the name is in the metadata)."""
    stores = {}
    for name, args in LAYOUTS.items():
        out = tmp_path_factory.mktemp("local") / "s.zarr"
        assert_ok(run(bucket, slices, out, "--quiet", *args))
        stores[name] = out
    return stores


def check_same(bucket: Bucket, name: str, prefix: str, local: Path, volume: np.ndarray) -> None:
    """The store at ``bucket/prefix`` holds the local store's files as objects, byte for byte, and nothing else;
    read back with zarr, every level equals the local store's and the reference pyramid."""
    objects = bucket.objects(prefix)
    files = store_files(local)
    assert sorted(objects) == sorted(files), (name, set(objects) ^ set(files))
    assert objects == files, name
    group, expected = bucket.group(f"s3://{prefix}"), zarr.open_group(str(local), mode="r")
    assert group.attrs.asdict() == expected.attrs.asdict()
    for level, reference in enumerate(pyramid(volume, LEVELS)):
        read = group[str(level)][...]
        np.testing.assert_array_equal(read, expected[str(level)][...])
        np.testing.assert_array_equal(read, reference)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_local_cluster_writes_the_local_runs_store_to_the_bucket(bucket, slices, volume, local_stores, layout):
    name = bucket.new()
    result = run(bucket, slices, f"s3://{name}/s.zarr", *LAYOUTS[layout], *SMALL, "--scheduler", "local:2", "-v")
    assert_ok(result)
    counts = [int(found[1]) for found in re.finditer(r"level \d+: (\d+) tasks, ", result.stderr)]
    assert len(counts) == LEVELS and all(count > 1 for count in counts), result.stderr
    assert f"wrote s3://{name}/s.zarr: 3 level(s)" in result.stderr
    check_same(bucket, layout, f"{name}/s.zarr", local_stores[layout], volume)


def test_a_plain_array_in_the_bucket_is_the_local_runs(bucket, slices, volume, tmp_path):
    """--zarr_only (the array at the prefix itself), zarr 3, zstd: the same objects as the local run's files."""
    name, args = bucket.new(), ("--quiet", "--zarr_only", "--zarr_format", "3", "--compressor", "zstd")
    local = tmp_path / "p.zarr"
    assert_ok(run(bucket, slices, local, *args))
    assert_ok(run(bucket, slices, f"s3://{name}/p.zarr", *args, *SMALL, "--scheduler", "local:1"))
    assert bucket.objects(f"{name}/p.zarr") == store_files(local)
    from zarr.storage import FsspecStore

    store = FsspecStore.from_url(f"s3://{name}/p.zarr", storage_options=bucket.options, read_only=True)
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[...], volume)


def test_the_plan_of_an_s3_output_writes_nothing(bucket, slices):
    name = bucket.new()
    result = run(bucket, slices, f"s3://{name}/s.zarr", *SMALL, "--scheduler", "local:1", "--dry_run")
    assert_ok(result)
    assert f"output: s3://{name}/s.zarr" in result.stdout and "tasks, on the Dask cluster" in result.stdout
    assert bucket.fs.find(name) == []


@pytest.fixture
def slow_tasks(tmp_path: Path) -> Path:
    """A module that, preloaded in a worker, makes each task take 0.3 s longer: a run long enough to kill."""
    directory = tmp_path / "slow"
    directory.mkdir()
    (directory / "scrollzarr_slow.py").write_text(
        "import time\n"
        "import scrollzarr.tasks\n"
        "_run_task = scrollzarr.tasks.run_task\n"
        "def run_task(job, task):\n"
        "    time.sleep(0.3)\n"
        "    return _run_task(job, task)\n"
        "scrollzarr.tasks.run_task = run_task\n"
    )
    return directory


@pytest.mark.parametrize("where", ["on the cluster", "here"])
def test_a_killed_client_is_resumed_to_the_local_runs_store(bucket, slices, volume, local_stores, slow_tasks, where):
    name = bucket.new()
    url, prefix = f"s3://{name}/s.zarr", f"{name}/s.zarr"
    env = {"PYTHONPATH": str(slow_tasks), "DASK_DISTRIBUTED__WORKER__PRELOAD": '["scrollzarr_slow"]'}
    process = subprocess.Popen(
        command(slices, url, "--quiet", *SMALL, "--scheduler", "local:2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(bucket, env),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while sum(key.endswith(".json") for key in bucket.fs.find(f"{prefix}/scrollzarr_tasks")) < 3:  # markers
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.kill()
    process.communicate()
    assert bucket.fs.isfile(f"{prefix}/scrollzarr_progress.json")
    assert "multiscales" not in json.loads(bucket.fs.cat_file(f"{prefix}/.zattrs"))
    result = run(bucket, slices, url, *SMALL, "--scheduler", "local:2")
    assert_one_line_error(result, f"{url} is an unfinished conversion", "continue it with --resume")
    cluster = ("--scheduler", "local:2") if where == "on the cluster" else ()
    result = run(bucket, slices, url, *SMALL, "--resume", "-v", *cluster)
    assert_ok(result)
    skipped = re.search(r"level 0: (\d+) tasks, (\d+) finished before", result.stderr)
    assert skipped is not None and 3 <= int(skipped[2]) < int(skipped[1]), result.stderr
    check_same(bucket, "zarr 2", prefix, local_stores["zarr 2"], volume)


def test_overwrite_replaces_a_store_in_the_bucket_and_nothing_else(bucket, slices, volume, local_stores):
    name = bucket.new()
    url, prefix = f"s3://{name}/s.zarr", f"{name}/s.zarr"
    # an older store there with other keys (chunks of 8, two levels): none of its objects may outlive --overwrite
    assert_ok(subprocess.run(
        [sys.executable, str(ROOT / "scroll_to_ome.py"), str(slices), url, "--chunk_size", "8", "--nlevels", "2",
         "--quiet", "--scheduler", "local:1"],
        capture_output=True, text=True, env=environment(bucket), timeout=600,
    ))  # fmt: skip
    result = run(bucket, slices, url, "--scheduler", "local:2")
    assert_one_line_error(result, f"output {url} already exists", "--overwrite")
    assert_ok(run(bucket, slices, url, "--quiet", *SMALL, "--overwrite", "--scheduler", "local:2"))
    check_same(bucket, "zarr 2", prefix, local_stores["zarr 2"], volume)


def test_overwrite_refuses_a_prefix_that_is_not_a_zarr_store(bucket, slices):
    name = bucket.new()
    bucket.fs.pipe_file(f"{name}/notes.zarr/readme.txt", b"not a store")
    bucket.fs.pipe_file(f"{name}/notes.zarr/0/0/0/0", b"looks like a chunk")
    result = run(bucket, slices, f"s3://{name}/notes.zarr", "--overwrite", "--scheduler", "local:1")
    assert_one_line_error(result, f"output s3://{name}/notes.zarr holds objects but is not a zarr store",
                          "--overwrite only replaces zarr stores")  # fmt: skip
    assert bucket.objects(f"{name}/notes.zarr") == {"readme.txt": b"not a store", "0/0/0/0": b"looks like a chunk"}


def test_a_prefix_left_half_emptied_by_overwrite_is_replaced_by_overwrite(bucket, slices, volume, local_stores):
    """A run stopped while --overwrite emptied a prefix leaves its mark and some level objects: --resume refuses
    it, --overwrite replaces it."""
    name = bucket.new()
    url, prefix = f"s3://{name}/s.zarr", f"{name}/s.zarr"
    bucket.fs.pipe_file(f"{prefix}/scrollzarr_emptying", b"")
    bucket.fs.pipe_file(f"{prefix}/0/9/9/9", b"an old chunk")
    result = run(bucket, slices, url, "--resume", "--scheduler", "local:1")
    assert_one_line_error(result, "nothing to resume", "emptied it for --overwrite", "start again with --overwrite")
    assert_ok(run(bucket, slices, url, "--quiet", *SMALL, "--overwrite", "--scheduler", "local:2"))
    check_same(bucket, "zarr 2", prefix, local_stores["zarr 2"], volume)


def test_resume_with_nothing_in_the_bucket_is_one_line(bucket, slices):
    name = bucket.new()
    result = run(bucket, slices, f"s3://{name}/s.zarr", "--resume", "--scheduler", "local:1")
    assert_one_line_error(result, f"nothing to resume: s3://{name}/s.zarr is not an unfinished scroll_to_ome")


def test_a_bucket_that_does_not_exist_is_one_line(bucket, slices):
    result = run(bucket, slices, "s3://no-such-bucket/s.zarr", "--scheduler", "local:1")
    assert_one_line_error(result, "the bucket no-such-bucket of the output s3://no-such-bucket/s.zarr does not exist",
                          "create it first")  # fmt: skip
    assert not bucket.fs.exists("no-such-bucket")


def test_an_endpoint_that_cannot_be_reached_is_one_line(bucket, slices):
    result = run(bucket, slices, "s3://bucket/s.zarr", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert_one_line_error(result, "cannot reach the bucket of the output s3://bucket/s.zarr", "AWS_ENDPOINT_URL")


def test_s3_without_a_scheduler_is_one_line(bucket, slices):
    name = bucket.new()
    result = run(bucket, slices, f"s3://{name}/s.zarr")
    assert_one_line_error(result, "writing to S3 runs as tasks", "--scheduler local:2", code=2)
    assert bucket.fs.find(name) == []


@pytest.mark.parametrize(
    ("output", "fragments"),
    [
        ("gs://bucket/s.zarr", ["gs:// is not supported", "s3://BUCKET/PREFIX.zarr"]),
        ("s3://bucket", ["give the bucket and a prefix in it"]),
        ("s3://bucket/s", ["output s3://bucket/s must end in .zarr", "s.zarr"]),
    ],
)
def test_a_bad_url_is_one_line(bucket, slices, output, fragments):
    assert_one_line_error(run(bucket, slices, output, "--scheduler", "local:1"), *fragments, code=2)


def test_first_new_level_on_s3_is_one_line(bucket, slices):
    name = bucket.new()
    result = run(bucket, slices, f"s3://{name}/s.zarr", "--first_new_level", "1", "--scheduler", "local:1")
    assert_one_line_error(result, "--first_new_level rebuilds a store on a file system", "aws s3 sync", code=2)


def test_without_s3fs_an_s3_output_is_one_line(bucket, slices, tmp_path):
    shim = tmp_path / "shim" / "s3fs"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no s3fs here')\n")
    result = run(bucket, slices, "s3://bucket/s.zarr", env={"PYTHONPATH": str(tmp_path / "shim")})
    assert_one_line_error(result, "writing to s3:// needs s3fs", 'pip install "scrollzarr[s3]"', code=2)


def test_a_worker_that_cannot_write_to_the_bucket_is_named(bucket, slices, tmp_path):
    """A worker whose environment names another endpoint (one where nothing answers) stops the run before anything
    is written, naming the worker and the output.  (A second moto server would not do: moto's servers in one
    process share their buckets.)"""
    from test_cluster import Cluster

    cluster = Cluster(tmp_path / "cluster", 1, **{**bucket.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    try:
        name = bucket.new()
        result = run(bucket, slices, f"s3://{name}/s.zarr", "--scheduler", cluster.file)
        assert_one_line_error(result, "Dask worker tcp://127.0.0.1:", f"cannot write into the output s3://{name}/s.zarr",
                              "AWS_ENDPOINT_URL")  # fmt: skip
        assert bucket.fs.find(name) == []
    finally:
        cluster.stop()
