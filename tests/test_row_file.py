"""Bands of rows written into a laid-out image: whole blocks with direct I/O, the rest through the page cache,
the file's bytes exactly the rows given, wherever the bands start and end."""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from scrollzarr import layertiff
from scrollzarr.layertiff import DIRECT_BYTES, ImageRows

from conftest import direct_io_allowed


def write_bands(directory: Path) -> tuple[bytes, bytes, list[int]]:
    """Lay out a file (header, rows, trailer), write its rows band by band out of order, each band on a thread
    of its own as the render does; the file's bytes, the bytes expected, and whether each band went direct."""
    rng = np.random.default_rng(7)
    height, width, offset = 1100, 3001, 123  # 6002-byte rows: no band starts or ends on a block
    rows = rng.integers(0, 2**16, size=(height, width), dtype=np.uint16)
    header, trailer = bytes(range(offset)), b"\xab" * 77
    path = directory / "image.tif"
    path.write_bytes(header + bytes(rows.nbytes) + trailer)
    image = ImageRows(path, offset, width * 2)
    bands = [(1, 2), (800, 1100), (0, 1), (2, 800)]  # (2, 800) is 4.8 MB: more than one direct buffer
    assert (800 - 2) * width * 2 > DIRECT_BYTES
    direct: list[int] = []

    def write(v0: int, v1: int) -> None:
        with image.open() as file:
            direct.append(file.direct >= 0)
            file.write(v0, rows[v0:v1])

    for v0, v1 in bands:
        with ThreadPoolExecutor(1) as thread:
            thread.submit(write, v0, v1).result()
    return path.read_bytes(), header + rows.tobytes() + trailer, direct


def test_bands_at_any_offset_give_the_rows_byte_for_byte(tmp_path):
    found, expected, direct = write_bands(tmp_path)
    assert found == expected
    assert direct == [direct_io_allowed(tmp_path)] * 4  # where the file system takes it, direct I/O was used


def refuse(error: int) -> OSError:
    return OSError(error, os.strerror(error))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no direct I/O on this system")
def test_a_file_system_without_direct_io_gets_the_same_bytes_through_the_page_cache(tmp_path, monkeypatch):
    """As tmpfs before Linux 6.6 and some network file systems: opening with O_DIRECT fails with EINVAL."""
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise refuse(errno.EINVAL)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(layertiff.os, "open", no_direct)
    found, expected, direct = write_bands(tmp_path)
    assert found == expected and direct == [False] * 4


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no direct I/O on this system")
def test_a_direct_write_refused_midway_is_written_through_the_page_cache(tmp_path, monkeypatch):
    """A disk that takes O_DIRECT at open but refuses the writes (a logical block larger than 4096 bytes)."""
    real_open, real_pwrite = os.open, os.pwrite
    direct: set[int] = set()

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct.add(fd)
        return fd

    def pwrite(fd, data, position):
        if fd in direct:
            raise refuse(errno.EINVAL)
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(layertiff.os, "open", open_)
    monkeypatch.setattr(layertiff.os, "pwrite", pwrite)
    found, expected, _ = write_bands(tmp_path)
    assert found == expected


def test_another_error_of_a_direct_write_is_raised(tmp_path, monkeypatch):
    """No space left (or any error but EINVAL) is the render's to report, not to hide behind the page cache."""
    real_pwrite = os.pwrite

    def pwrite(fd, data, position):
        if len(data) >= 4096:
            raise refuse(errno.ENOSPC)
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(layertiff.os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space left"):
        write_bands(tmp_path)
