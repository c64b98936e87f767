"""Bands of rows written into a laid-out image: whole pages with direct I/O, the rest through the page cache,
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


def write_bands(directory: Path, direct: bool = True) -> tuple[bytes, bytes, list[bool]]:
    """Lay out a file (header, rows, trailer), write its rows band by band out of order, each band on a thread
    of its own; the file's bytes, the bytes expected, and whether each band's file still wrote directly after."""
    rng = np.random.default_rng(7)
    height, width, offset = 1100, 3001, 123  # 6002-byte rows: no band starts or ends on a page
    rows = rng.integers(0, 2**16, size=(height, width), dtype=np.uint16)
    header, trailer = bytes(range(offset)), b"\xab" * 77
    path = directory / "image.tif"
    path.write_bytes(header + bytes(rows.nbytes) + trailer)
    image = ImageRows(path, offset, width * 2)
    bands = [(1, 2), (800, 1100), (0, 1), (2, 800)]  # (2, 800) is 4.8 MB: more than one direct buffer
    assert (800 - 2) * width * 2 > DIRECT_BYTES
    stayed: list[bool] = []

    def write(v0: int, v1: int) -> None:
        with image.open(direct) as file:
            file.write(v0, rows[v0:v1])
            stayed.append(file.direct >= 0)

    for v0, v1 in bands:
        with ThreadPoolExecutor(1) as thread:
            thread.submit(write, v0, v1).result()
    return path.read_bytes(), header + rows.tobytes() + trailer, stayed


def test_bands_at_any_offset_give_the_rows_byte_for_byte(tmp_path):
    found, expected, stayed = write_bands(tmp_path)
    assert found == expected
    assert stayed == [direct_io_allowed(tmp_path)] * 4  # where the file system takes it, direct I/O was used


def test_bands_written_through_the_page_cache_give_the_same_bytes(tmp_path):
    """As on a cluster, where several processes write bands of one file at once."""
    found, expected, stayed = write_bands(tmp_path, direct=False)
    assert found == expected and stayed == [False] * 4


def refuse(error: int) -> OSError:
    return OSError(error, os.strerror(error))


class DirectSpy:
    """Records the descriptors opened with O_DIRECT and the writes to each; fails the ``refuse_at``-th write to a
    descriptor with ``error``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse_at: int = 0, error: int = errno.EINVAL) -> None:
        self.writes: dict[int, int] = {}
        real_open, real_pwrite = os.open, os.pwrite

        def open_(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            if flags & os.O_DIRECT:
                self.writes[fd] = 0
            return fd

        def pwrite(fd, data, position):
            if fd in self.writes:
                self.writes[fd] += 1
                if self.writes[fd] == refuse_at:
                    raise refuse(error)
            return real_pwrite(fd, data, position)

        monkeypatch.setattr(layertiff.os, "open", open_)
        monkeypatch.setattr(layertiff.os, "pwrite", pwrite)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no direct I/O on this system")
def test_a_file_system_without_direct_io_gets_the_same_bytes_through_the_page_cache(tmp_path, monkeypatch):
    """As tmpfs before Linux 6.6 and some network file systems: opening with O_DIRECT fails with EINVAL."""
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise refuse(errno.EINVAL)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(layertiff.os, "open", no_direct)
    found, expected, stayed = write_bands(tmp_path)
    assert found == expected and stayed == [False] * 4


def test_a_direct_write_refused_midway_is_written_through_the_page_cache(tmp_path, monkeypatch):
    """A disk that takes O_DIRECT at open but refuses a later write (a logical block larger than 4096 bytes):
    the band's second direct write (its first went through) and the rest go through the page cache."""
    if not direct_io_allowed(tmp_path):
        pytest.skip("this file system has no direct I/O")
    spy = DirectSpy(monkeypatch, refuse_at=2)
    found, expected, stayed = write_bands(tmp_path)
    assert found == expected
    assert stayed == [True, True, True, False] and max(spy.writes.values()) == 2


def test_another_error_of_a_direct_write_is_raised(tmp_path, monkeypatch):
    """No space left (or any error but EINVAL) is the render's to report, not to hide behind the page cache."""
    if not direct_io_allowed(tmp_path):
        pytest.skip("this file system has no direct I/O")
    DirectSpy(monkeypatch, refuse_at=1, error=errno.ENOSPC)
    with pytest.raises(OSError, match="No space left"):
        write_bands(tmp_path)
