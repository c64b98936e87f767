"""ppm_to_layers renders a volume on a web server or in a bucket as it renders the same volume on disk.

The volumes are the synthetic scroll converted by scroll_to_ome into the
published layouts (uint8 zarr 2 uncompressed and blosc-zstd, and sharded
zarr 3).  A web server started here (tests/dataserver.py) serves them with
latency and a 429 now and then, and records every request; a moto server
started here is the bucket.  The remote render's files are compared byte for
byte with the local render's, and the local render with the numpy reference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from scrollzarr.diskcache import DiskCache
from scrollzarr.synthetic import write_stack

from conftest import ROOT, assert_ok, assert_one_line_error, scroll_to_ome, write_sheet
from dataserver import data_server
from reference import layers_reference

SHAPE = (40, 96, 112)  # z, y, x
LAYOUTS = {
    "uint8": ["--preset", "open-data"],
    "uint8-blosc-zstd": ["--preset", "open-data-zstd"],
    "zarr3-sharded": ["--preset", "v3-sharded", "--shard_shape", "32,64,64"],
}
PASSWORD = "s3cret-Pa55"


def ppm_to_layers(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The script, with ``env`` added to a clean environment (no login, no AWS endpoint, HOME here)."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SCROLLZARR_HTTP_", "AWS_")) and key not in ("NETRC", "XDG_CACHE_HOME")
    }
    environment |= {"PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "ppm_to_layers.py"), *map(str, args)],
        capture_output=True, text=True, env=environment, timeout=600,
    )  # fmt: skip


def render(
    sheet: tuple[Path, np.ndarray], volume: object, out: Path, *args: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """5 layers of the sheet into ``out/layers`` and its stacked image ``out/stack.tif``."""
    return ppm_to_layers(sheet[0], volume, out / "layers", out / "stack.tif", "--number_of_layers", 5, *args, env=env)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """The synthetic scroll in every layout, 32-chunks, 2 levels, under one directory the server serves."""
    root = tmp_path_factory.mktemp("remote")
    write_stack(root / "tiffs", SHAPE)
    for name, options in LAYOUTS.items():
        args = [root / "tiffs", root / "served" / f"{name}.zarr", "--chunk_size", 32, "--nlevels", 2, *options]
        assert_ok(scroll_to_ome(*args, "--quiet"))
    return root


@pytest.fixture(scope="module")
def sheet(stores) -> tuple[Path, np.ndarray]:
    """A .ppm along the sheet through every slice, with an unmapped hole."""
    return write_sheet(stores, SHAPE)


@pytest.fixture(scope="module")
def local_renders(stores, sheet) -> dict[str, Path]:
    """Each layout rendered from disk (5 layers and the stacked image), checked against the reference."""
    renders = {}
    for name in LAYOUTS:
        out = stores / "local" / name
        store = stores / "served" / f"{name}.zarr"
        assert_ok(render(sheet, store, out))
        volume = zarr.open_array(store / "0", mode="r")[:]
        layers = np.stack([_tiff(out / "layers" / f"{k:02d}.tif") for k in range(5)])
        reference = layers_reference(volume, sheet[1], 5, 1.0)
        assert np.abs(layers.astype(np.float64) - reference).max() < 0.55
        renders[name] = out
    return renders


def _tiff(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def chunk_requests(requests) -> list[tuple[str, str | None]]:
    """(path, range) of the requests answered with data, but the metadata's (fetched at every open)."""
    metadata = (".zarray", ".zattrs", ".zgroup", "zarr.json")
    return [(r.path, r.range) for r in requests if r.status in (200, 206) and not r.path.endswith(metadata)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_volume_on_a_web_server_renders_as_on_disk_fetching_each_chunk_once(
    stores, sheet, local_renders, layout, tmp_path
):
    cache = tmp_path / "cache"
    with data_server(stores / "served", latency=0.005, busy_every=7) as server:
        url = f"{server.url}/{layout}.zarr"
        out = tmp_path / "remote"
        result = render(sheet, url, out, "--cache_dir", cache)
        assert_ok(result)
        assert server.answered(429), "the server never said 429: the retries were not tried"
        fetched = chunk_requests(server.requests)
        assert fetched, "no chunk was fetched"
        assert len(fetched) == len(set(fetched)), "a chunk was fetched twice"
        assert files(out) == files(local_renders[layout])
        assert f"{len(fetched)} chunk objects fetched" in result.stderr

        # Again: every chunk from the disk cache, the same files.
        server.requests.clear()
        again = tmp_path / "again"
        result = render(sheet, url, again, "--cache_dir", cache)
        assert_ok(result)
        assert chunk_requests(server.requests) == []
        assert f"0 chunk objects fetched (0 bytes), {len(fetched)} read from the disk cache" in result.stderr
        assert files(again) == files(local_renders[layout])


def test_a_server_that_ignores_ranges_still_gives_the_sharded_volume(stores, sheet, local_renders, tmp_path):
    with data_server(stores / "served", honour_ranges=False) as server:
        out = tmp_path / "remote"
        url = f"{server.url}/zarr3-sharded.zarr"
        assert_ok(render(sheet, url, out, "--cache_gb", 0))
        assert files(out) == files(local_renders["zarr3-sharded"])


def test_without_the_disk_cache_nothing_is_kept(stores, sheet, local_renders, tmp_path):
    with data_server(stores / "served") as server:
        out = tmp_path / "remote"
        url = f"{server.url}/uint8.zarr"
        env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
        assert_ok(render(sheet, url, out, "--cache_gb", 0, env=env))
        assert files(out) == files(local_renders["uint8"])
        assert not (tmp_path / "xdg").exists()
        # The default place: $XDG_CACHE_HOME/scrollzarr.
        assert_ok(ppm_to_layers(sheet[0], url, tmp_path / "l2", "--number_of_layers", 5, env=env))
        assert any((tmp_path / "xdg" / "scrollzarr").rglob("*"))


def test_a_cache_dir_that_cannot_be_made_is_a_warning_not_a_failure(stores, sheet, local_renders, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with data_server(stores / "served") as server:
        out = tmp_path / "remote"
        url = f"{server.url}/uint8.zarr"
        result = render(sheet, url, out, "--cache_dir", blocker / "c")
    assert_ok(result)
    assert "no disk cache" in result.stderr and "every chunk is fetched" in result.stderr
    assert files(out) == files(local_renders["uint8"])


def test_a_login_from_netrc_or_the_environment_never_logged(stores, sheet, local_renders, tmp_path):
    netrc = tmp_path / "login.netrc"
    netrc.write_text(f"machine 127.0.0.1 login reader password {PASSWORD}\n")
    netrc.chmod(0o600)
    with data_server(stores / "served", login=("reader", PASSWORD)) as server:
        url = f"{server.url}/uint8.zarr"
        denied = ppm_to_layers(sheet[0], url, tmp_path / "none", "--number_of_layers", 5, "--cache_gb", 0)
        assert_one_line_error(denied, "asks for a login", "~/.netrc", "SCROLLZARR_HTTP_USER", code=1)
        assert not (tmp_path / "none").exists()

        for name, env in {
            "netrc": {"NETRC": str(netrc)},
            "environment": {"SCROLLZARR_HTTP_USER": "reader", "SCROLLZARR_HTTP_PASSWORD": PASSWORD},
        }.items():
            out = tmp_path / name
            result = render(
                sheet,
                url,
                out,
                "--cache_gb",
                0,
                "--verbose",
                env=env,
            )
            assert_ok(result)
            assert files(out) == files(local_renders["uint8"])
            assert PASSWORD not in result.stdout + result.stderr

        wrong = ppm_to_layers(
            sheet[0], url, tmp_path / "wrong", "--number_of_layers", 5, "--cache_gb", 0,
            env={"SCROLLZARR_HTTP_USER": "reader", "SCROLLZARR_HTTP_PASSWORD": "guess"},
        )  # fmt: skip
        assert_one_line_error(wrong, "refused the login", code=1)
        half = ppm_to_layers(
            sheet[0], url, tmp_path / "half", "--number_of_layers", 5, env={"SCROLLZARR_HTTP_USER": "reader"}
        )
        assert_one_line_error(half, "SCROLLZARR_HTTP_PASSWORD is not", code=2)


def test_a_login_in_the_url_is_refused_without_showing_it(stores, sheet, tmp_path):
    result = ppm_to_layers(
        sheet[0], f"https://reader:{PASSWORD}@example.org/v.zarr", tmp_path / "o", "--number_of_layers", 5
    )
    assert_one_line_error(result, "does not belong on the command line", "~/.netrc", code=2)
    assert PASSWORD not in result.stderr


def test_a_server_that_stays_busy_is_one_line(stores, sheet, tmp_path):
    with data_server(stores / "served", busy_every=1) as server:
        result = ppm_to_layers(
            sheet[0], f"{server.url}/uint8.zarr", tmp_path / "o", "--number_of_layers", 5, "--cache_gb", 0
        )
    assert_one_line_error(result, "could not be fetched: HTTP 429 after 8 attempts", "try again later", code=1)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        ("nothing.zarr", ["neither a zarr array nor an OME-Zarr group"]),
        ("uint8.zarr/0/0", ["neither a zarr array nor an OME-Zarr group"]),
    ],
)
def test_a_url_that_is_not_a_volume_is_one_line(stores, sheet, tmp_path, path, fragments):
    with data_server(stores / "served") as server:
        result = ppm_to_layers(
            sheet[0], f"{server.url}/{path}", tmp_path / "o", "--number_of_layers", 5, "--cache_gb", 0
        )
    assert_one_line_error(result, *fragments, code=1)


def test_a_server_that_is_not_there_is_one_line(sheet, tmp_path):
    with data_server(tmp_path) as server:
        url = f"{server.url}/v.zarr"
    result = ppm_to_layers(sheet[0], url, tmp_path / "o", "--number_of_layers", 5, "--cache_gb", 0)
    assert_one_line_error(result, url, "could not be fetched", "ConnectError", code=1)


def test_a_bad_cache_bound_is_one_line(sheet, tmp_path):
    result = ppm_to_layers(sheet[0], "https://example.org/v.zarr", tmp_path / "o", "--cache_gb", -1)
    assert_one_line_error(result, "--cache_gb must be 0 (no disk cache) or a positive number", code=2)


def test_the_disk_cache_keeps_its_bound_the_most_recently_used_first(tmp_path):
    cache = DiskCache(tmp_path / "c", max_bytes=12_000)
    for k in range(10):  # 1012 bytes each, with the trailer: 10120 in all
        cache.put(f"k{k}", bytes([k]) * 1000)
        (path,) = (p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.read_bytes()[:1] == bytes([k]))
        os.utime(path, ns=(k, k))  # used in the order written
    assert cache.get("k0") == bytes(1000)  # used now: the most recently used
    cache.put("k10", b"x" * 3000)  # over the bound: the least recently used leave, down to 90 % of it
    total = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert total <= 10_800
    assert [cache.get(f"k{k}") is not None for k in range(11)] == [True, False, False, False] + [True] * 7
    # Another cache (another run) over the same directory finds what this one kept.
    assert DiskCache(tmp_path / "c", max_bytes=12_000).get("k9") == bytes([9]) * 1000
    assert (tmp_path / "c" / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")


def test_the_disk_cache_never_removes_files_that_are_not_its_own(tmp_path):
    folder = tmp_path / "data"
    (folder / "seg").mkdir(parents=True)
    (folder / "seg" / "00.tif").write_bytes(b"a layer" * 1000)
    (folder / "ab").mkdir()
    (folder / "ab" / "notes.txt").write_text("mine")  # in a folder named like the cache's, not named like its files
    os.utime(folder / "seg" / "00.tif", ns=(0, 0))  # older than anything the cache writes
    cache = DiskCache(folder, max_bytes=3000)
    for k in range(10):
        cache.put(f"k{k}", bytes(1000))  # far over the bound: evicted again and again
    assert (folder / "seg" / "00.tif").read_bytes() == b"a layer" * 1000
    assert (folder / "ab" / "notes.txt").read_text() == "mine"
    assert cache.get("k9") == bytes(1000)


def test_a_damaged_cache_file_is_a_miss_not_voxels(tmp_path):
    cache = DiskCache(tmp_path / "c", max_bytes=10**6)
    cache.put("chunk", b"abcdef" * 100)
    (path,) = (p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.parent != tmp_path / "c")  # not the tag
    path.write_bytes(path.read_bytes()[:100])  # cut short, as a power cut may leave it
    assert cache.get("chunk") is None
    assert not path.exists()
    cache.put("chunk", b"abcdef" * 100)
    data = bytearray(path.read_bytes())
    data[3] ^= 1  # one bit flipped
    path.write_bytes(bytes(data))
    assert cache.get("chunk") is None


moto_server = pytest.importorskip("moto.server")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.parametrize("layout", ["uint8-blosc-zstd", "zarr3-sharded"])
def test_a_volume_in_a_bucket_renders_as_on_disk(stores, sheet, local_renders, layout, tmp_path):
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        client = boto3.client("s3", endpoint_url=endpoint, **_boto(CREDENTIALS))
        client.create_bucket(Bucket="scrolls")
        store = stores / "served" / f"{layout}.zarr"
        for path in store.rglob("*"):
            if path.is_file():
                client.put_object(Bucket="scrolls", Key=f"v/{path.relative_to(store.parent)}", Body=path.read_bytes())
        out = tmp_path / "remote"
        env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
        url = f"s3://scrolls/v/{layout}.zarr"
        result = render(
            sheet,
            url,
            out,
            "--cache_dir",
            tmp_path / "c",
            env=env,
        )
        assert_ok(result)
        assert files(out) == files(local_renders[layout])
        missing = ppm_to_layers(sheet[0], "s3://scrolls/none.zarr", tmp_path / "o", "--number_of_layers", 5, env=env)
        assert_one_line_error(missing, "s3://scrolls/none.zarr", "neither a zarr array nor an OME-Zarr group", code=1)
    finally:
        server.stop()


def _boto(credentials: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
        "region_name": credentials["AWS_DEFAULT_REGION"],
    }


def test_a_server_going_down_keeps_the_bands_and_resume_finishes(stores, sheet, local_renders, tmp_path):
    out = tmp_path / "remote"
    with data_server(stores / "served") as server:
        url = f"{server.url}/uint8.zarr"
        server.fail_after = 12  # the volume's metadata, twice (this process and the sampler), and a few chunks
        failed = render(sheet, url, out, "--cache_gb", 0, "--block_size", 4, "--workers", 1)
        assert_one_line_error(failed, "could not be fetched: HTTP 503 after 8 attempts", "--resume", code=1)
        assert "the bands rendered so far are kept" in failed.stderr
        assert not list((out / "layers").glob("*.tif")) and (out / "layers" / ".00.tif.partial").exists()
        server.fail_after = None
        resumed = render(sheet, url, out, "--cache_gb", 0, "--block_size", 4, "--workers", 1, "--resume")
        assert_ok(resumed)
    assert files(out) == files(local_renders["uint8"])


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_while_requests_wait_to_be_retried_stops_at_once(stores, sheet, tmp_path, workers):
    out = tmp_path / "remote"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SCROLLZARR_HTTP_", "AWS_"))}
    with data_server(stores / "served", retry_after="20") as server:
        server.fail_after = 12
        command = [sys.executable, ROOT / "ppm_to_layers.py", sheet[0], f"{server.url}/uint8.zarr", out / "layers"]
        command += ["--number_of_layers", 5, "--cache_gb", 0, "--block_size", 4, "--workers", workers]
        process = subprocess.Popen(
            list(map(str, command)), stderr=subprocess.PIPE, text=True, env={**environment, "PYTHONPATH": str(ROOT)}
        )
        deadline = time.monotonic() + 60
        while not server.answered(503) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.answered(503), "the render never reached the server going down"
        process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        waited = time.monotonic() - stopped
    assert process.returncode == 130, stderr
    assert waited < 10, f"{waited:.1f} s after Ctrl-C (a retry waits 20 s)"
    assert "interrupted; to continue: " in stderr and "--resume" in stderr


def test_urls_and_logins_that_cannot_be_used_are_one_line(sheet, tmp_path):
    bad = ppm_to_layers(sheet[0], "http://[::1", tmp_path / "o")
    assert_one_line_error(bad, "is not a valid URL", code=2)
    ftp = ppm_to_layers(sheet[0], "ftp://example.org/v.zarr", tmp_path / "o")
    assert_one_line_error(ftp, "ftp:// is not read; give an https://, http:// or s3:// URL, or a path", code=2)
    netrc = tmp_path / "binary.netrc"
    netrc.write_bytes(b"\xff\xfe\x00machine")
    garbled = ppm_to_layers(sheet[0], "http://127.0.0.1:9/v.zarr", tmp_path / "o", env={"NETRC": str(netrc)})
    assert_one_line_error(garbled, "binary.netrc cannot be read", "fix it, or move it away", code=2)
    assert not (tmp_path / "o").exists()


def test_a_forbidden_folder_is_one_line(stores, sheet, tmp_path):
    with data_server(stores / "served", refuse=403) as server:
        forbidden = ppm_to_layers(sheet[0], f"{server.url}/uint8.zarr", tmp_path / "o", "--cache_gb", 0)
    assert_one_line_error(forbidden, "the server refuses access (HTTP 403)", code=1)
    # Refused past the first request (the probe of zarr.json): zarr then reads three metadata objects at once, and
    # all three fail (without the probe, one of them once printed "Task exception was never retrieved" in CI).
    with data_server(stores / "served", refuse=403, refused=(".zarray", ".zgroup", ".zattrs")) as server:
        forbidden = ppm_to_layers(sheet[0], f"{server.url}/uint8.zarr", tmp_path / "o", "--cache_gb", 0)
    assert_one_line_error(forbidden, "the server refuses access (HTTP 403)", code=1)
    assert "Task exception was never retrieved" not in forbidden.stderr


def test_a_server_answering_missing_files_with_a_web_page_renders_as_on_disk(stores, sheet, local_renders, tmp_path):
    """All-zero chunks have no file; a server that answers a missing file with an HTML page (200) has none."""
    with data_server(stores / "served", html_for_missing=True) as server:
        out = tmp_path / "remote"
        assert_ok(render(sheet, f"{server.url}/uint8.zarr", out, "--cache_gb", 0))
        assert server.answered(200)
    assert files(out) == files(local_renders["uint8"])


def test_a_bucket_that_cannot_be_reached_is_one_line(sheet, tmp_path):
    with data_server(tmp_path) as server:
        endpoint = server.url  # a port that is free once the server is gone
    env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
    result = ppm_to_layers(sheet[0], "s3://scrolls/v.zarr", tmp_path / "o", "--cache_gb", 0, env=env)
    assert_one_line_error(result, "s3://scrolls/v.zarr cannot be reached", "check the URL, the network", code=1)
    assert "Exception ignored" not in result.stderr
    assert not (tmp_path / "o").exists()
