"""scroll_serve in a real browser: headless Chromium (Debian's chromium and chromedriver, which .ci/run installs)
loads the Neuroglancer link scroll_serve prints, with the Neuroglancer client of the ``neuroglancer`` package's
bundled static files served locally (the tests have no internet), for a zarr 2 store and a sharded zarr 3 store.

The test reads scroll_serve's own record of the requests it answered (``--log_requests``): chunks of every level
must have been asked for and answered with data; and a screenshot of the slice view must show the scroll, not a
blank canvas.  Zooming out is a change of the link's ``crossSectionScale``, as a user's mouse wheel makes it.
"""

from __future__ import annotations

import functools
import io
import json
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scrollzarr.synthetic import write_stack

from conftest import assert_ok, scroll_to_ome
from scrollserve import Served, scroll_serve, state_of

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(
        "headless Chromium is not installed here: apt-get install chromium chromium-driver (.ci/run does)",
        allow_module_level=True,
    )
neuroglancer = pytest.importorskip("neuroglancer", reason="pip install neuroglancer (a test dependency)")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (a test dependency)")

SHAPE = (64, 160, 192)
LEVELS = 3
# The flags Chromium needs here: no sandbox as root, no network of its own (this machine's closed network refuses
# its background connections), WebGL drawn on the CPU by SwiftShader (there is no GPU).
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--window-size=1000,800",
]
CHUNK = re.compile(r'"GET /(?P<level>\d+)/(?:c/)?\d+/\d+/\d+ HTTP/1\.1" (?P<status>\d+)')


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("browser")
    write_stack(base / "tiffs", SHAPE)
    levels = ["--chunk_size", 32, "--nlevels", LEVELS, "--quiet"]
    assert_ok(scroll_to_ome(base / "tiffs", base / "v2.zarr", *levels))
    sharded = ["--zarr_format", 3, "--shard_shape", "32,64,64", "--compressor", "blosc-zstd"]
    assert_ok(scroll_to_ome(base / "tiffs", base / "v3.zarr", *levels, *sharded))
    return base


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[str]:
    """The Neuroglancer client, served at ``/v/scrollzarr/``: the package's bundled client runs only under such a
    path (it is the one its Python server serves), and reads the viewer's state from the link's fragment."""
    root = tmp_path_factory.mktemp("client")
    shutil.copytree(Path(neuroglancer.__file__).parent / "static" / "client", root / "v" / "scrollzarr")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v/scrollzarr/"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def answered_levels(served: Served) -> tuple[set[int], set[int]]:
    """The levels whose chunks scroll_serve was asked for, and those of which it answered some with data."""
    asked, answered = set(), set()
    for line in served.messages():
        match = CHUNK.search(line)
        if match:
            asked.add(int(match["level"]))
            if match["status"] in ("200", "206"):
                answered.add(int(match["level"]))
    return asked, answered


def look(driver, link: str, served: Served) -> np.ndarray:
    """Load ``link``, wait until the requests stop (2 s without one), and return the screenshot (grey, 2-D)."""
    driver.get("about:blank")
    driver.get(link)
    deadline, quiet_since, seen = time.monotonic() + 120, time.monotonic(), 0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        count = len(served.messages())
        if count != seen:
            seen, quiet_since = count, time.monotonic()
        elif time.monotonic() - quiet_since > 4 and any(CHUNK.search(line) for line in served.lines):
            break
    time.sleep(1)  # the last chunks drawn
    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L"))


def zoomed(link: str, scale: float) -> str:
    """The link with the slice view alone, zoomed out ``scale`` times (screen pixels per voxel: 1 / scale)."""
    state = state_of(link)
    state.update(layout="xy", crossSectionScale=scale)
    return link.split("#!", 1)[0] + "#!" + urllib.parse.quote(json.dumps(state))


def shows_the_scroll(image: np.ndarray) -> bool:
    """Whether the middle of the view holds the scroll's grey values (a blank canvas is one colour)."""
    height, width = image.shape
    middle = image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4]
    return bool(middle.std() > 10 and len(np.unique(middle)) > 30)


@pytest.mark.parametrize("name", ["v2.zarr", "v3.zarr"])
def test_neuroglancer_draws_every_level_from_the_printed_link(stores, client, browser, name):
    with scroll_serve(stores / name, "--neuroglancer", client, "--log_requests", stores=1) as served:
        link = served.links["."]
        assert link.startswith(client + "#!")
        assert state_of(link)["layers"][0]["source"].startswith("zarr2://" if name == "v2.zarr" else "zarr3://")
        first = look(browser, link, served)  # as printed: the four panels
        assert shows_the_scroll(first[: first.shape[0] // 2, : first.shape[1] // 2]), "the xy panel is blank"
        assert shows_the_scroll(look(browser, zoomed(link, 0.5), served)), "the slice view is blank"
        for scale in (2.0, 4.0):  # zoomed out: the coarser levels
            look(browser, zoomed(link, scale), served)
        asked, answered = answered_levels(served)
        errors = [line for line in served.lines if re.search(r'" (5\d\d|403|416)\b', line)]
    assert asked == answered == set(range(LEVELS)), (asked, answered)
    assert errors == []
