"""scroll_serve PATH: the real server on a free port, asked with httpx as Neuroglancer asks (byte ranges, suffix
ranges, HEAD, CORS preflights from another origin), and the links it prints.

Every answer is compared with the file's bytes read here; the contrast of each link with percentiles computed
here from the store's lowest level read by tensorstore, an independent reader.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tensorstore as ts

from scrollzarr.synthetic import write_stack

from conftest import ROOT, assert_ok, assert_one_line_error, run_script, scroll_to_ome
from scrollserve import raw_get, scroll_serve, state_of

SHAPE = (48, 64, 80)
ORIGIN = {"Origin": "https://neuroglancer-demo.appspot.com"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder of three stores: uint16 zarr 2, uint8 zarr 2, sharded zarr 3 (one folder deeper), and a file."""
    base = tmp_path_factory.mktemp("serve")
    write_stack(base / "tiffs", SHAPE)
    served = base / "served"
    levels = ["--chunk_size", 16, "--nlevels", 3, "--quiet"]
    assert_ok(scroll_to_ome(base / "tiffs", served / "u16.zarr", *levels))
    assert_ok(scroll_to_ome(base / "tiffs", served / "u8.zarr", *levels, "--obytes", 1))
    sharded = ["--zarr_format", 3, "--shard_shape", "16,32,32", "--compressor", "blosc-zstd"]
    assert_ok(scroll_to_ome(base / "tiffs", served / "more" / "v3.zarr", *levels, *sharded))
    (served / "notes.txt").write_text("not a store")
    return served


def percentiles(path: Path, zarr_format: int) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of the non-zero voxels of the lowest level (2) of a store: small enough here
    to be read whole, as scroll_serve's central 256³ sample is."""
    driver = "zarr" if zarr_format == 2 else "zarr3"
    data = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(path / "2")}}).result().read().result()
    values = np.asarray(data)[np.asarray(data) != 0]
    low, high = np.percentile(values, [0.5, 99.5])
    return float(np.floor(low)), float(np.ceil(high))


def test_links_open_each_store_with_its_source_and_contrast(root):
    with scroll_serve(root, stores=3) as served:
        assert sorted(served.links) == ["more/v3.zarr", "u16.zarr", "u8.zarr"]
        for name, zarr_format in (("u16.zarr", 2), ("u8.zarr", 2), ("more/v3.zarr", 3)):
            link = served.links[name]
            assert link.startswith("https://neuroglancer-demo.appspot.com/#!")
            state = state_of(link)
            (layer,) = state["layers"]
            assert layer["type"] == "image" and layer["name"] == Path(name).name
            assert layer["source"] == f"zarr{zarr_format}://{served.base}/{name}/"
            assert tuple(layer["shaderControls"]["normalized"]["range"]) == percentiles(root / name, zarr_format)
            # the source as given answers: Neuroglancer reads its metadata first
            metadata = ".zattrs" if zarr_format == 2 else "zarr.json"
            assert httpx.get(f"{served.base}/{name}/{metadata}").content == (root / name / metadata).read_bytes()
        messages = "".join(served.messages())
        assert "u8.zarr: zarr 2, uint8, contrast" in messages and "more/v3.zarr: zarr 3, uint16" in messages


def test_uint8_and_uint16_contrasts_differ_in_scale(root):
    with scroll_serve(root, stores=3) as served:
        u8 = state_of(served.links["u8.zarr"])["layers"][0]["shaderControls"]["normalized"]["range"]
        u16 = state_of(served.links["u16.zarr"])["layers"][0]["shaderControls"]["normalized"]["range"]
    assert 0 <= u8[0] < u8[1] <= 255 and u16[1] > 255  # the uint8 store is the uint16 one // 256


def test_a_store_given_itself_is_served_at_the_root(root):
    with scroll_serve(root / "u16.zarr", stores=1) as served:
        (name,) = served.links
        assert name == "."
        assert state_of(served.links["."])["layers"][0]["source"] == f"zarr2://{served.base}/"
        assert httpx.get(f"{served.base}/.zarray").status_code == 404  # the group's metadata is .zattrs
        assert httpx.get(f"{served.base}/0/.zarray").content == (root / "u16.zarr" / "0" / ".zarray").read_bytes()


def test_neuroglancer_gets_byte_ranges_suffixes_head_and_cors(root):
    chunk = next(path for path in sorted((root / "u16.zarr" / "0").rglob("*")) if path.stat().st_size == 16**3 * 2)
    relative = chunk.relative_to(root).as_posix()
    data = chunk.read_bytes()
    with scroll_serve(root, stores=3) as served:
        url = f"{served.base}/{relative}"
        whole = httpx.get(url, headers=ORIGIN)
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["access-control-allow-origin"] == "*"
        exposed = {name.strip().lower() for name in whole.headers["access-control-expose-headers"].split(",")}
        assert {"content-range", "content-length", "content-encoding"} <= exposed

        part = httpx.get(url, headers={**ORIGIN, "Range": "bytes=100-299"})
        assert part.status_code == 206 and part.content == data[100:300]
        assert part.headers["content-range"] == f"bytes 100-299/{len(data)}"
        assert part.headers["content-length"] == "200"

        suffix = httpx.get(url, headers={**ORIGIN, "Range": "bytes=-64"})
        assert suffix.status_code == 206 and suffix.content == data[-64:]
        assert suffix.headers["content-range"] == f"bytes {len(data) - 64}-{len(data) - 1}/{len(data)}"

        past = httpx.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert past.status_code == 416

        head = httpx.head(url, headers=ORIGIN)
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(data))

        preflight = httpx.options(
            url,
            headers={
                **ORIGIN,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "range",
                "Access-Control-Request-Private-Network": "true",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert "range" in preflight.headers["access-control-allow-headers"].lower()
        assert "GET" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-private-network"] == "true"

        missing = httpx.get(f"{served.base}/u16.zarr/0/9/9/9", headers=ORIGIN)  # an all-zero chunk, never written
        assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == "*"


def test_a_shard_index_is_read_with_a_suffix_range(root):
    """What Neuroglancer does with a sharded zarr 3 store: the index at the shard's end, then one chunk's range."""
    shard = next(path for path in sorted((root / "more" / "v3.zarr" / "0" / "c").rglob("*")) if path.is_file())
    data = shard.read_bytes()
    index_bytes = 8 * 2 * 1 * 2 * 2 + 4  # (offset, length) per inner chunk (1 x 2 x 2 of 16³ in 16 x 32 x 32), CRC
    with scroll_serve(root, stores=3) as served:
        url = f"{served.base}/{shard.relative_to(root).as_posix()}"
        index = httpx.get(url, headers={"Range": f"bytes=-{index_bytes}"})
        assert index.status_code == 206 and index.content == data[-index_bytes:]
        entries = np.frombuffer(index.content[:-4], "<u8").reshape(-1, 2)
        offset, length = next((int(o), int(n)) for o, n in entries if o != 2**64 - 1)
        inner = httpx.get(url, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        assert inner.status_code == 206 and inner.content == data[offset : offset + length]


def test_requests_for_what_lies_outside_the_folder_are_refused(root, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inside.txt").write_text("public")
    (folder / "out").symlink_to(tmp_path)  # a symlink leading out of the served folder
    (folder / "link.txt").symlink_to(secret)
    (folder / "same.txt").symlink_to(folder / "inside.txt")  # one staying inside: followed
    with scroll_serve(folder) as served:
        base = served.base
        assert httpx.get(f"{base}/inside.txt").text == "public"
        assert httpx.get(f"{base}/same.txt").text == "public"
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", "//" + str(secret).lstrip("/"),
                     "/out/secret.txt", "/link.txt", "/%2F" + str(secret).lstrip("/"), "/..%5csecret.txt",
                     "/./../secret.txt", "/inside.txt/../../secret.txt", "/%00/../secret.txt"):  # fmt: skip
            status, body = raw_get(base, path)  # sent as written: httpx would remove the dot segments
            assert status in (403, 404), path
            assert b"private" not in body, path
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            answer = httpx.request(method, f"{base}/inside.txt", content=b"x")
            assert answer.status_code == 405, method
            assert "GET" in answer.headers["allow"]
        plain = httpx.options(f"{base}/inside.txt")
        assert plain.status_code == 204 and "OPTIONS" in plain.headers["allow"]
        assert httpx.get(f"{base}/").status_code == 404  # no listing of folders
        messages = "".join(served.messages())
        assert "no zarr store found" in messages
    assert (folder / "inside.txt").read_text() == "public"


def test_discovery_does_not_wander_out_through_a_symlink(root, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "u8.zarr").symlink_to(root / "u8.zarr")  # a store elsewhere, linked in: refused by the server
    with scroll_serve(folder) as served:
        assert served.links == {}
        assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 404
    (folder / "u8.zarr").unlink()
    (folder / "real").mkdir()
    (folder / "real" / ".zarray").write_bytes((root / "u8.zarr" / "0" / ".zarray").read_bytes())  # a plain array
    (folder / "alias").symlink_to(folder / "real")  # staying inside: followed, as the server follows it
    with scroll_serve(folder, stores=2) as served:
        assert sorted(served.links) == ["alias", "real"]
        assert httpx.get(f"{served.base}/alias/.zarray").status_code == 200


def test_log_requests_prints_each_request_and_quiet_prints_only_links(root):
    with scroll_serve(root, "--log_requests", stores=3) as served:
        httpx.get(f"{served.base}/u8.zarr/.zattrs")
        httpx.get(f"{served.base}/u8.zarr/0/9/9/9")
        lines = "".join(served.messages(0.5))
        assert '"GET /u8.zarr/.zattrs HTTP/1.1" 200' in lines and '"GET /u8.zarr/0/9/9/9 HTTP/1.1" 404' in lines
    with scroll_serve(root, stores=3) as served:
        httpx.get(f"{served.base}/u8.zarr/.zattrs")
        assert "GET /u8.zarr" not in "".join(served.messages(0.5))
    command = [sys.executable, str(ROOT / "scroll_serve.py"), str(root), "--port", "0", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        links = [process.stdout.readline() for _ in range(3)]
        assert all("#!" in link for link in links)
        source = state_of(links[0].split(": ", 1)[1])["layers"][0]["source"]
        assert httpx.get(source.split("://", 1)[1] + "zarr.json").status_code == 200  # listening: Ctrl-C stops it
    finally:
        process.send_signal(2)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and err == "", err


def test_ctrl_c_stops_it_at_once_with_exit_0(root):
    with scroll_serve(root, stores=3) as served:
        assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 200
        client = socket.create_connection(("127.0.0.1", int(served.base.rsplit(":", 1)[1])))  # an idle browser
        code, _ = served.stop()
        client.close()
    assert code == 0
    assert not any("Traceback" in line for line in served.lines), served.lines


def test_neuroglancer_option_and_open_call_the_browser(root, tmp_path):
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> {opened}\nsleep 60\n')  # waits, as some browsers do
    browser.chmod(browser.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, BROWSER=str(browser))
    app = "http://127.0.0.1:1/v/app/"
    with scroll_serve(root, "--neuroglancer", app, "--open", stores=3, env=env) as served:
        assert all(link.startswith(app + "#!") for link in served.links.values())
        for _ in range(100):
            if opened.exists():
                break
            time.sleep(0.1)
        assert opened.read_text().split() == [served.links["more/v3.zarr"]]  # the first, by path
        assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 200  # served while the browser waits
        assert "opening the first of the 3 links" in "".join(served.messages())


def test_bind_elsewhere_warns(root):
    with scroll_serve(root, "--bind", "0.0.0.0", stores=3) as served:
        assert served.base.startswith("http://127.0.0.1:")
        assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 200
        assert "every machine that reaches this one" in "".join(served.messages())


def test_bad_input_is_one_line(root, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        cases = [
            ([tmp_path / "nowhere"], "does not exist"),
            ([root / "notes.txt"], "is not a folder"),
            ([root, "--port", port], "is in use"),
            ([root, "--port", 70000], "--port must be between 0"),
            ([root, "--bind", "no.such.host.invalid"], "--bind no.such.host.invalid"),
            ([root, "--neuroglancer", "neuroglancer.example"], "--neuroglancer neuroglancer.example"),
            ([root, "--proxy", "https://example.org/"], "not both"),
            ([], "give PATH to serve, or --proxy URL"),
            ([root, "--user", "me"], "--user is the login for --proxy"),
            (["--proxy", "ftp://example.org/x"], "give the upstream's http:// or https://"),
            (["--proxy", "https://me:secret@example.org/x"], "a login does not belong on the command line"),
            (["--proxy", "https://example.org/", "--cache_gb", -1], "--cache_gb must be 0"),
            (["--proxy", "http://127.0.0.1:99999/"], "the port must be between 1 and 65535"),
            (["--proxy", "http://a b/"], "has no valid host name"),
            ([""], "PATH is empty"),
            ([root, "--neuroglancer", "http://"], "--neuroglancer http://"),
        ]
        for args, fragment in cases:
            result = run_script("scroll_serve.py", *args)
            assert_one_line_error(result, fragment)
            assert "secret" not in result.stderr
    finally:
        taken.close()


def test_answers_read_at_once_and_starlettes_agree_with_the_bytes(tmp_path):
    """Small answers are read in one go (scrollzarr.serving._ReadAtOnce); larger ones, several ranges and
    If-Range are Starlette's own: each compared with the file's bytes."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    large = rng.integers(0, 256, 9 * 2**20 + 7, dtype=np.uint8).tobytes()  # over 8 MiB: Starlette's
    (tmp_path / "small.bin").write_bytes(small)
    (tmp_path / "large.bin").write_bytes(large)
    with scroll_serve(tmp_path) as served:
        for name, data in (("small.bin", small), ("large.bin", large)):
            url = f"{served.base}/{name}"
            assert httpx.get(url).content == data
            for header, expected in ((f"bytes=5-{len(data) + 100}", data[5:]), ("bytes=7-", data[7:]),
                                     (f"bytes=-{len(data) + 5}", data), ("bytes=0-0", data[:1])):  # fmt: skip
                answer = httpx.get(url, headers={"Range": header})
                assert answer.status_code == 206 and answer.content == expected, (name, header)
                assert answer.headers["content-length"] == str(len(expected))
            several = httpx.get(url, headers={"Range": "bytes=0-9,20-29"})
            assert several.status_code == 206 and several.headers["content-type"].startswith("multipart/byteranges")
            assert data[:10] in several.content and data[20:30] in several.content
            etag = httpx.head(url).headers["etag"]
            assert httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}).content == data[:10]
            assert httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'}).content == data
            assert httpx.get(url, headers={"If-None-Match": etag}).status_code == 304
            assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
            assert httpx.get(url, headers={"Range": "bytes=9-3"}).status_code == 400
            other = httpx.get(url, headers={"Range": "lines=1-2"})  # a unit other than bytes: ignored
            assert other.status_code == 200 and other.content == data


def test_links_of_stores_with_awkward_names_open_them(root, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    names = ["h#x.zarr", "q?y.zarr", "p%20c.zarr", "sp ace.zarr", "ünï.zarr"]
    for name in names:
        shutil.copytree(root / "u8.zarr", folder / name)
    (folder / "bad.zarr").mkdir()  # damaged metadata: an unknown codec in its lowest level
    for path in (root / "u8.zarr").rglob(".z*"):
        target = folder / "bad.zarr" / path.relative_to(root / "u8.zarr")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    zarray = folder / "bad.zarr" / "2" / ".zarray"
    zarray.write_text(zarray.read_text().replace('"compressor": null', '"compressor": {"id": "nosuch"}'))
    with scroll_serve(folder, stores=len(names)) as served:
        assert sorted(served.links) == sorted(names)
        for name in names:
            source = state_of(served.links[name])["layers"][0]["source"]
            answer = httpx.get(source.split("://", 1)[1] + ".zattrs")  # as Neuroglancer asks, the URL as given
            assert answer.status_code == 200, (name, source)
        messages = "".join(served.messages())
        assert "bad.zarr: not shown, its lowest level cannot be opened" in messages
        assert "bad.zarr/" not in messages  # nor its levels shown as arrays of their own


def test_links_piped_to_head_leave_the_server_running(root):
    command = [sys.executable, str(ROOT / "scroll_serve.py"), str(root), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        link = process.stdout.readline()
        process.stdout.close()  # as head -1 does
        source = state_of(link.split(": ", 1)[1])["layers"][0]["source"].split("://", 1)[1]
        time.sleep(1)
        assert process.poll() is None
        assert httpx.get(source + "zarr.json").status_code == 200
    finally:
        process.send_signal(2)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "error" not in err, err


def test_other_host_names_are_refused_and_bind_elsewhere_takes_any(root):
    with scroll_serve(root, stores=3) as served:
        assert httpx.get(f"{served.base}/u8.zarr/.zattrs", headers={"Host": "evil.example:9000"}).status_code == 400
        assert httpx.get(f"{served.base}/u8.zarr/.zattrs", headers={"Host": "localhost"}).status_code == 200
    with scroll_serve(root, "--bind", "0.0.0.0", stores=3) as served:
        assert httpx.get(f"{served.base}/u8.zarr/.zattrs", headers={"Host": "scrolls.lab:9000"}).status_code == 200


def test_ctrl_c_during_a_download_stops_without_a_traceback(tmp_path):
    (tmp_path / "big.bin").write_bytes(bytes(64 * 2**20))  # streamed by Starlette, 64 KiB at a time
    with scroll_serve(tmp_path) as served:
        slow = socket.create_connection(("127.0.0.1", int(served.base.rsplit(":", 1)[1])))
        try:
            slow.sendall(b"GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            slow.recv(1024)  # the download has begun; the client reads no more
            code, _ = served.stop()
        finally:
            slow.close()
    assert code == 0
    assert not any("Traceback" in line or "CancelledError" in line for line in served.lines), served.lines
