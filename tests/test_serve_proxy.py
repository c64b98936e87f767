"""scroll_serve --proxy against a real upstream started by the test (tests/dataserver.py): one that demands a
basic-auth login, answers 429 now and then, and records every request it gets.

What the proxy answers is compared with the upstream's files read here; what it asked the upstream, with the
upstream's own record.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from scrollzarr.synthetic import write_stack

from conftest import ROOT, assert_ok, assert_one_line_error, scroll_to_ome
from dataserver import data_server
from scrollserve import raw_get, scroll_serve, state_of

USER, PASSWORD = "segmenter", "pa55-Wörd-secret"
SHAPE = (32, 48, 64)


@pytest.fixture(scope="module")
def upstream_root(tmp_path_factory) -> Path:
    """``data/u8.zarr`` (the proxied store) and, outside the proxied folder, ``secret.txt``."""
    base = tmp_path_factory.mktemp("upstream")
    write_stack(base / "tiffs", SHAPE)
    root = base / "root"
    assert_ok(scroll_to_ome(base / "tiffs", root / "data" / "u8.zarr", "--chunk_size", 16, "--nlevels", 2,
                            "--obytes", 1, "--quiet"))  # fmt: skip
    (root / "secret.txt").write_text("not for the proxy")
    return root


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """An environment whose home has no .netrc, and no login variables."""
    (tmp_path / "home").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("SCROLLZARR_HTTP")}
    env.pop("NETRC", None)
    return dict(env, HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "xdg"))


def with_netrc(env: dict[str, str], tmp_path: Path, password: str = PASSWORD) -> dict[str, str]:
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {password}\n")
    netrc.chmod(0o600)
    return env


def a_chunk(root: Path) -> Path:
    return next(
        path
        for path in sorted((root / "data" / "u8.zarr" / "0").rglob("*"))
        if path.is_file() and path.stat().st_size == 16**3
    )


def test_logged_in_from_netrc_cached_and_never_told(upstream_root, home, tmp_path):
    env = with_netrc(home, tmp_path)
    cache = tmp_path / "cache"
    chunk = a_chunk(upstream_root)
    key = chunk.relative_to(upstream_root / "data" / "u8.zarr").as_posix()
    data = chunk.read_bytes()
    # The login and a 429 now and then, from one upstream; --user names another user: .netrc's entry wins, and
    # nothing is asked (there is no terminal to ask on)
    with data_server(upstream_root, login=(USER, PASSWORD), busy_every=5, retry_after="0") as upstream:
        prefix = f"{upstream.url}/data/u8.zarr/"
        args = ["--proxy", prefix, "--cache_dir", cache, "--verbose", "--log_requests", "--user", "someone"]
        with scroll_serve(*args, stores=1, env=env) as served:
            (link,) = served.links.values()
            layer = state_of(link)["layers"][0]
            assert layer["source"] == f"zarr2://{served.base}/" and layer["name"] == "u8.zarr"
            low, high = layer["shaderControls"]["normalized"]["range"]
            assert 0 <= low < high <= 255

            def view() -> None:
                assert httpx.get(f"{served.base}/.zattrs").content == (chunk.parents[3] / ".zattrs").read_bytes()
                part = httpx.get(f"{served.base}/{key}", headers={"Range": "bytes=10-99"})
                assert part.status_code == 206 and part.content == data[10:100]
                assert part.headers["content-range"] == f"bytes 10-99/{len(data)}"
                suffix = httpx.get(f"{served.base}/{key}", headers={"Range": "bytes=-16"})
                assert suffix.status_code == 206 and suffix.content == data[-16:]
                # Logged in: what it fetches is for the Neuroglancer app's pages, not any site's
                app = "https://neuroglancer-demo.appspot.com"
                whole = httpx.get(f"{served.base}/{key}", headers={"Origin": app})
                assert whole.status_code == 200 and whole.content == data
                assert whole.headers["access-control-allow-origin"] == app
                missing = httpx.get(f"{served.base}/0/9/9/9", headers={"Origin": app})
                assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == app
                other = httpx.get(f"{served.base}/{key}", headers={"Origin": "https://evil.example"})
                assert "access-control-allow-origin" not in other.headers
                head = httpx.head(f"{served.base}/{key}")
                assert head.status_code == 200 and head.headers["content-length"] == str(len(data))

            view()
            first = len(upstream.requests)
            assert all(request.authorization for request in upstream.answered()), "every request logged in"
            assert {request.range for request in upstream.requests} >= {"bytes=10-99", "bytes=-16", None}
            assert upstream.answered(429), "the upstream was busy now and then"
            view()  # a second viewing: from the cache
            assert len(upstream.requests) == first
            messages = "".join(served.messages(0.5))
        with scroll_serve(*args, stores=1, env=env) as served:  # after a restart: still from the cache
            view()
            messages += "".join(served.messages(0.5))
        # At each start the link's metadata is read afresh (zarr's probing: zarr.json, .zgroup ...); nothing else.
        metadata = ("zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata")
        assert all(request.path.endswith(metadata) for request in upstream.requests[first:])
        assert all(request.path.startswith("/data/u8.zarr/") for request in upstream.requests)
    assert f'"GET /{key} HTTP/1.1" 206' in messages
    header = upstream.answered()[0].authorization  # Basic base64(user:password)
    secrets = [PASSWORD.encode(), header.encode(), header.split()[1].encode()]
    for path in [*cache.rglob("*"), *tmp_path.rglob("*")]:
        if path.is_file() and path.name != ".netrc":
            assert not any(secret in path.read_bytes() for secret in secrets), path
            if path.is_relative_to(cache) and path.name != "CACHEDIR.TAG":
                assert path.stat().st_mode & 0o077 == 0, path  # the cached answers: the user's alone
    assert PASSWORD not in messages and header.split()[1] not in messages and "Authorization" not in messages


def test_without_a_login_the_browser_gets_401_and_the_user_is_told_once(upstream_root, home, tmp_path):
    with data_server(upstream_root, login=(USER, PASSWORD)) as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/", "--cache_dir", tmp_path / "c", env=home) as served:
            for _ in range(3):
                assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 401
            messages = "".join(served.messages(0.5))
        assert messages.count("asks for a login (HTTP 401)") == 1, messages
        assert "~/.netrc" in messages and "--user" in messages
    wrong = with_netrc(home, tmp_path, "wrong")
    with data_server(upstream_root, login=(USER, PASSWORD)) as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/", "--cache_dir", tmp_path / "c", env=wrong) as served:
            assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 401
            assert "refused the login (HTTP 401)" in "".join(served.messages(0.5))
        # The store itself: its metadata is read at the start, refused; told once, and served (401s) all the same.
        with scroll_serve("--proxy", f"{upstream.url}/data/u8.zarr", "--cache_gb", 0, env=wrong) as served:
            assert served.links == {}
            assert httpx.get(f"{served.base}/.zattrs").status_code == 401
            messages = "".join(served.messages(0.5))
        assert messages.count("refused the login (HTTP 401)") == 1, messages
        assert "wrong" not in messages and "Traceback" not in messages


def test_user_with_the_password_from_the_environment(upstream_root, home, tmp_path):
    env = dict(home, SCROLLZARR_HTTP_PASSWORD=PASSWORD)
    with data_server(upstream_root, login=(USER, PASSWORD)) as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/", "--user", USER, "--cache_gb", 0, env=env) as served:
            assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 200
            assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 200
        assert len(upstream.answered()) == 2  # --cache_gb 0: nothing kept, asked twice


def at_the_prompt(upstream: str, home: dict[str, str], *args: object) -> tuple[subprocess.Popen[str], int, bytes]:
    """``scroll_serve --proxy upstream --user segmenter args`` on a real terminal (a pty that is its controlling
    terminal), as a user starts it, once it asks for the password: the process, the terminal's side to type on,
    and what it showed."""
    master, slave = pty.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    command = [sys.executable, str(ROOT / "scroll_serve.py"), "--proxy", upstream, "--user", USER, "--port", "0"]
    process = subprocess.Popen(
        [*command, *map(str, args)], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(home, PYTHONPATH=str(ROOT)), preexec_fn=own_terminal,
    )  # fmt: skip
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 30
    while b"password of segmenter on 127.0.0.1" not in shown and time.monotonic() < deadline:
        shown += os.read(master, 1024)
    return process, master, shown


def test_user_asked_for_the_password_at_a_prompt(upstream_root, home, tmp_path):
    with data_server(upstream_root, login=(USER, PASSWORD)) as upstream:
        process, master, shown = at_the_prompt(f"{upstream.url}/data/", home, "--cache_dir", tmp_path / "c")
        try:
            os.write(master, PASSWORD.encode() + b"\n")
            line = ""
            while "proxying" not in line:
                line = process.stderr.readline()
                assert line, "scroll_serve stopped"
            base = line.split(" at ")[1].split("/ (")[0]
            assert httpx.get(f"{base}/u8.zarr/.zattrs").status_code == 200
        finally:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
            time.sleep(0.2)
            try:
                while True:
                    shown += os.read(master, 1024)
            except OSError:
                pass
            os.close(master)
    assert process.returncode == 0, err
    assert PASSWORD.encode() not in shown and PASSWORD not in err  # not echoed
    assert upstream.answered()[0].authorization is not None


def test_busy_upstream_is_retried_and_the_answers_are_whole(upstream_root, home, tmp_path):
    chunks = [path for path in sorted((upstream_root / "data" / "u8.zarr" / "0").rglob("*")) if path.is_file()]
    chunks = [path for path in chunks if not path.name.startswith(".")]
    with data_server(upstream_root, busy_every=3, retry_after="0") as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/u8.zarr/", "--cache_gb", 0, stores=1, env=home) as served:

            async def fetch_all() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    keys = [path.relative_to(upstream_root / "data" / "u8.zarr").as_posix() for path in chunks]
                    return await asyncio.gather(*(client.get(f"{served.base}/{key}") for key in keys))

            answers = asyncio.run(fetch_all())
        assert [answer.content for answer in answers] == [path.read_bytes() for path in chunks]
        assert all(answer.status_code == 200 for answer in answers)
        assert len(upstream.answered(429)) >= len(chunks) // 3


def test_the_same_request_at_once_goes_upstream_once(upstream_root, home, tmp_path):
    chunk = a_chunk(upstream_root)
    key = chunk.relative_to(upstream_root / "data").as_posix()
    with data_server(upstream_root, latency=0.5) as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/", "--cache_dir", tmp_path / "c", env=home) as served:

            async def twelve() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    return await asyncio.gather(*(client.get(f"{served.base}/{key}") for _ in range(12)))

            answers = asyncio.run(twelve())
        assert all(answer.content == chunk.read_bytes() for answer in answers)
        assert [request.path for request in upstream.requests].count(f"/data/{key}") == 1


def test_paths_leaving_the_prefix_are_refused_and_never_asked(upstream_root, home, tmp_path):
    with data_server(upstream_root) as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/", "--cache_gb", 0, env=home) as served:
            for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", "/u8.zarr/../../secret.txt",
                         "/.%2e/secret.txt", "/u8.zarr/%2e%2e%2f%2e%2e%2fsecret.txt", "/u8.zarr/..%5c..%5csecret.txt",
                         "/u8.zarr/%00/x"):  # fmt: skip
                status, body = raw_get(served.base, path)
                assert status == 403, path
                assert b"not for the proxy" not in body, path
            for method in ("POST", "PUT", "DELETE"):
                assert httpx.request(method, f"{served.base}/u8.zarr/.zattrs").status_code == 405
        assert all(request.path.startswith("/data/") for request in upstream.requests), upstream.requests
        assert not any(".." in r.path or "%2f" in r.path.lower() for r in upstream.requests), upstream.requests


def test_an_upstream_that_stays_down_is_a_502_and_one_warning_per_request(upstream_root, home, tmp_path):
    with data_server(upstream_root, fail_after=0, retry_after="0") as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/", "--cache_dir", tmp_path / "c", env=home) as served:
            started = len(upstream.requests)  # its start's probe: told, and served all the same
            answer = httpx.get(f"{served.base}/u8.zarr/.zattrs", timeout=60)
            assert answer.status_code == 502 and "HTTP 503 after 8 attempts" in answer.text
            warnings = [line for line in served.messages(0.5) if "could not be fetched" in line]
        assert len(warnings) == 2 and "proxying it anyway" in warnings[0]
        assert started == 2 and len(upstream.requests) == started + 8
    with data_server(upstream_root) as upstream:  # up again: not remembered as failed
        args = ["--proxy", f"{upstream.url}/data/", "--cache_dir", tmp_path / "c"]
        with scroll_serve(*args, env=home) as served:
            assert httpx.get(f"{served.base}/u8.zarr/.zattrs").status_code == 200


def test_redirects_are_followed_only_inside_the_prefix(upstream_root, home, tmp_path):
    chunk = a_chunk(upstream_root)
    key = chunk.relative_to(upstream_root / "data").as_posix()
    redirects = {"/data/moved": f"/data/{key}", "/data/away": "/secret.txt", "/data/sly": "/data/%2e%2e/secret.txt"}
    with data_server(upstream_root, redirects=redirects) as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/", "--cache_gb", 0, env=home) as served:
            assert httpx.get(f"{served.base}/moved").content == chunk.read_bytes()
            for path in ("away", "sly"):
                away = httpx.get(f"{served.base}/{path}")
                assert away.status_code == 502 and "not for the proxy" not in away.text
            assert "redirects out of" in "".join(served.messages(0.5))
        assert [request.path for request in upstream.requests if "secret" in request.path] == []


def test_the_same_large_request_at_once_each_gets_its_own_stream(tmp_path, home):
    """Answers over 64 MiB are streamed through, not kept: each of the same requests made at once is its own."""
    root = tmp_path / "up"
    (root / "data").mkdir(parents=True)
    data = np.random.default_rng(2).integers(0, 256, 65 * 2**20, dtype=np.uint8).tobytes()
    (root / "data" / "big.bin").write_bytes(data)
    with data_server(root) as upstream:
        with scroll_serve("--proxy", f"{upstream.url}/data/", "--cache_dir", tmp_path / "c", env=home) as served:

            async def four() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=120) as client:
                    return await asyncio.gather(*(client.get(f"{served.base}/big.bin") for _ in range(4)))

            answers = asyncio.run(four())
            assert all(answer.status_code == 200 and answer.content == data for answer in answers)
            assert httpx.get(f"{served.base}/big.bin", headers={"Range": "bytes=-5"}).content == data[-5:]
            assert not any("Traceback" in line for line in served.messages(0.5))
        assert not any(path.stat().st_size > 2**20 for path in (tmp_path / "c").rglob("*") if path.is_file())


def test_upstream_urls_are_compared_as_httpx_writes_them(upstream_root, home, tmp_path):
    spaced = upstream_root / "data" / "a space"
    if not spaced.exists():
        spaced.symlink_to(upstream_root / "data" / "u8.zarr")
    with data_server(upstream_root) as upstream:
        prefix = f"HTTP://127.0.0.1:{upstream.port}/data/a space/"
        with scroll_serve("--proxy", prefix, "--cache_gb", 0, stores=1, env=home) as served:
            answer = httpx.get(f"{served.base}/.zattrs")
            assert answer.status_code == 200
            assert answer.content == (upstream_root / "data" / "u8.zarr" / ".zattrs").read_bytes()


def test_other_host_names_are_refused(upstream_root, home, tmp_path):
    """DNS rebinding: a page of another site, its name pointed at 127.0.0.1, asks with that name in Host."""
    with (
        data_server(upstream_root) as upstream,
        scroll_serve("--proxy", f"{upstream.url}/data/", "--cache_gb", 0, env=home) as served,
    ):
        assert httpx.get(f"{served.base}/u8.zarr/.zattrs", headers={"Host": "evil.example"}).status_code == 400
        port = served.base.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1"):
            assert httpx.get(f"{served.base}/u8.zarr/.zattrs", headers={"Host": host}).status_code == 200
        public = httpx.get(f"{served.base}/u8.zarr/.zattrs", headers={"Origin": "https://any.example"})
        assert public.headers["access-control-allow-origin"] == "*"  # no login: a public server's files


def test_ctrl_d_at_the_password_prompt_is_one_line(home):
    process, master, _ = at_the_prompt("http://127.0.0.1:9/data/", home)
    os.write(master, b"\x04")
    _, err = process.communicate(timeout=30)
    os.close(master)
    assert process.returncode == 2 and "Traceback" not in err
    assert err.strip().endswith("--user segmenter: no password given"), err


def test_user_without_a_password_or_a_terminal_and_a_query_are_one_line(home):
    for args, fragment in (
        (["--user", USER], "run scroll_serve in a terminal to be asked"),
        (["--user", USER, "--proxy", "http://127.0.0.1:9/data/?x=1"], "without a query"),
    ):
        command = [sys.executable, str(ROOT / "scroll_serve.py"), "--proxy", "http://127.0.0.1:9/data/", *args]
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
                                env=dict(home, PYTHONPATH=str(ROOT)))  # fmt: skip
        assert_one_line_error(result, fragment, code=2)
