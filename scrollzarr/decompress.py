"""decompress_tiffs: a directory of compressed TIFFs becomes uncompressed TIFFs that read at disk speed.

Each file is an independent unit of work: decoded (tifffile, with the
codecs of imagecodecs) and written uncompressed and contiguous under a
hidden temporary name, then renamed; files already uncompressed are copied
as they are.  A file under its final name is therefore always complete, and
running the same command again skips it: the work resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from scrollzarr.allocator import keep_freed_memory
from scrollzarr.durable import fsync_directories, fsync_path, hidden_partial_path
from scrollzarr.errors import ScrollzarrError
from scrollzarr.layertiff import write_at
from scrollzarr.options import check_workers
from scrollzarr.outputlock import OutputLock
from scrollzarr.report import progress
from scrollzarr.sizes import format_bytes
from scrollzarr.store import ZARR_METADATA
from scrollzarr.tiffstack import NUMBERED_TIFF, pixel_data_end
from scrollzarr.workers import Workers, available_cores

log = logging.getLogger(__name__)

TIFF_NAME = re.compile(r"\.tiff?$", re.IGNORECASE)
NO_COMPRESSION = 1
BIGTIFF_ABOVE = 2**32 - 2**25
# Tags copied as they are: names, dates, software, and ImageJ's binary metadata (ranges, LUTs, labels).
KEPT_TAGS = {269, 271, 272, 285, 306, 315, 316, 33432, 50838, 50839}
RAW_TYPES = {1, 7}  # BYTE, UNDEFINED: copied as raw bytes


@dataclass
class FileResult:
    """What happened to one file.

    Attributes
    ----------
    name : str
    action : {"decompressed", "copied", "skipped", "failed"}
    nbytes : int
        Bytes of the output file (0 when failed).
    error : str or None
        Why the file failed.
    verified : bool
        Its output was read back and compared with the input.
    """

    name: str
    action: str
    nbytes: int = 0
    error: str | None = None
    verified: bool = False


@dataclass
class DecompressReport:
    """A run's results, for the summary."""

    output: Path
    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, action: str) -> int:
        return sum(result.action == action for result in self.results)

    @property
    def failures(self) -> list[FileResult]:
        return [result for result in self.results if result.action == "failed"]

    def summary(self) -> str:
        written = sum(r.nbytes for r in self.results if r.action in ("decompressed", "copied"))
        lines = [
            f"{self.output}: {self.count('decompressed')} files decompressed, {self.count('copied')} already "
            f"uncompressed copied, {self.count('skipped')} finished earlier skipped; {format_bytes(written)} "
            f"written in {self.seconds:.1f} s ({written / max(self.seconds, 1e-9) / 1e6:.0f} MB/s)"
        ]
        verified = sum(r.verified for r in self.results)
        if verified:
            lines.append(f"  verified {verified} files: pixels equal to the input's")
        if self.failures:
            lines.append(f"  failed: {', '.join(r.name for r in self.failures)}")
        return "\n".join(lines)


class SourceError(Exception):
    """An input file that cannot be read or decoded; the run goes on with the others."""


@contextmanager
def _reading(source: Path) -> Iterator[None]:
    """Turn what tifffile and each codec raise for a damaged ``source`` into one :class:`SourceError`."""
    try:
        yield
    except SourceError:
        raise
    except Exception as error:  # tifffile and each codec raise their own kinds
        raise SourceError(f"{source.name}: cannot read: {type(error).__name__}: {error}") from None


def list_tiffs(directory: Path) -> list[Path]:
    """The ``.tif``/``.tiff`` names of ``directory``, by slice number (names without a number last, by name).

    Every such name is listed, also one that cannot be read (a dangling symbolic link, a directory), so
    that it is reported as a failed file rather than skipped in silence.
    """
    files = [p for p in directory.iterdir() if TIFF_NAME.search(p.name) and not p.name.startswith(".")]

    def key(path: Path) -> tuple[int, int, str]:
        match = NUMBERED_TIFF.search(path.name)
        return (0, int(match.group(1)), path.name) if match else (1, 0, path.name)

    return sorted(files, key=key)


def has_output(input_dir: Path, output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a file under one of the input TIFFs' names: a run to continue."""
    try:
        return any((output_dir / path.name).is_file() for path in list_tiffs(input_dir))
    except OSError:
        return False


def _file_size(path: Path) -> int:
    """Bytes of ``path``, 0 if it cannot be read (it is then reported as a failed file)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _check_source(source: Path) -> None:
    """Refuse, as a failed file, an input name that is not a readable regular file."""
    if source.is_file():
        return
    if source.is_symlink() and not source.exists():
        why = f"it is a symbolic link to {os.readlink(source)}, which does not exist"
    elif source.is_dir():
        why = "it is a directory"
    else:
        why = "it is not a regular file"
    raise SourceError(f"{source.name}: cannot read: {why}")


def check_directories(input_dir: Path, output_dir: Path) -> None:
    """Refuse an input that is not a directory, and an output that is, or contains, the input."""
    if not input_dir.exists():
        raise ScrollzarrError(f"input directory {input_dir} does not exist")
    if not input_dir.is_dir():
        raise ScrollzarrError(f"input {input_dir} is not a directory")
    if output_dir.exists() and not output_dir.is_dir():
        raise ScrollzarrError(f"output {output_dir} is a file; OUTPUT_TIFF_DIR must be a directory")
    source, target = input_dir.resolve(), output_dir.resolve()
    if source == target:
        raise ScrollzarrError(f"the output directory is the input directory {input_dir}; choose another one")
    if target in source.parents:
        raise ScrollzarrError(
            f"the output directory {output_dir} contains the input directory {input_dir}; choose another one"
        )
    store = next((d for d in (target, *target.parents) if any((d / m).is_file() for m in ZARR_METADATA)), None)
    if store is not None:  # its TIFFs would be taken for a store's files, and deleted with it by --overwrite
        raise ScrollzarrError(
            f"the output directory {output_dir} is inside the zarr store {store}; write the TIFFs elsewhere"
        )


def decompress_file(source: Path, target: Path, overwrite: bool, verify: bool) -> FileResult:
    """Write ``target``, the uncompressed copy of ``source``, unless a finished one is there.

    Problems with ``source`` give a failed result; problems writing ``target``
    (a full disk, say) raise, since they stop every file alike.
    """
    name = source.name
    if target.is_dir():  # never replaced, not even with --overwrite: it may hold anything
        return FileResult(name, "failed", error=f"{target} is a directory; move or rename it, then run again")
    try:
        _check_source(source)
        if target.exists() and not overwrite:
            problem = _not_a_finished_copy(source, target)
            if problem is not None:
                return FileResult(name, "failed", error=f"{target} exists but {problem}; add --overwrite to replace it")
            return FileResult(name, "skipped", target.stat().st_size, verified=verify and _verify(source, target))
        pages, copy = _read(source)
    except SourceError as error:
        return FileResult(name, "failed", error=str(error))
    partial = hidden_partial_path(target)
    try:
        if copy:
            shutil.copyfile(source, partial)
        else:
            _write(partial, pages)
        # Flushed before it gets its final name: after a power cut a name must not come back with its data lost.
        # Cost, measured on 48 masked zlib slices of 2048 x 2048 (384 MiB written, input in the page cache,
        # this project's loaded 2-core VM, medians of 3): --workers 1 takes 2.16 s against 1.71 s without it
        # (1.81 s counting a sync after the run); two workers 2.87 s against 3.01 s, within the noise, since one
        # worker's flush overlaps the other's decoding.
        fsync_path(partial)
        # Checked before it gets its final name, so that a file that fails is not taken for finished.
        verified = verify and _verify(source, partial, [data for data, _ in pages] if pages else None)
        os.replace(partial, target)
    except SourceError as error:
        return FileResult(name, "failed", error=str(error))
    finally:
        partial.unlink(missing_ok=True)
    return FileResult(name, "copied" if copy else "decompressed", target.stat().st_size, verified=verified)


def _read(source: Path) -> tuple[list[tuple[np.ndarray, dict[str, Any]]], bool]:
    """Decoded pages of ``source`` with the keywords that write them again; or ``([], True)`` to copy it as is."""
    with _reading(source), tifffile.TiffFile(source) as tiff:
        pages = list(tiff.pages)
        if not pages:
            raise SourceError(f"{source.name}: cannot read: no image in the file")
        _check_length(source, pages)
        if all(p.compression == NO_COMPRESSION and not p.is_tiled for p in pages):
            return [], True
        raw = source.read_bytes()
        with open(source, "rb") as handle:
            return [(_decode(raw, index, page), _keywords(page, handle)) for index, page in enumerate(pages)], False


def _decode(raw: bytes, index: int, page: Any) -> np.ndarray:
    """Page ``index``'s pixels: decoded by libtiff (imagecodecs' build), whose LZW and deflate decoders are
    2-3 times faster than tifffile's codecs; by tifffile where libtiff gives another shape or type."""
    try:
        data = imagecodecs.tiff_decode(raw, index=index)
    except Exception:  # libtiff refuses what tifffile may still read; tifffile reports real damage
        data = None
    if data is None or data.shape != page.shape or data.dtype != page.dtype:
        return page.asarray(maxworkers=1)
    return data


def _check_length(source: Path, pages: list[Any]) -> None:
    size = source.stat().st_size
    end = max(pixel_data_end(page) for page in pages)
    if end > size:
        raise SourceError(f"{source.name}: truncated: its pixel data runs to byte {end} of a {size}-byte file")


def _keywords(page: Any, handle: Any) -> dict[str, Any]:
    """What ``tifffile.TiffWriter.write`` needs to give the page its meaning again (uncompressed)."""
    tags = page.tags
    keywords: dict[str, Any] = {
        "photometric": page.photometric,
        "planarconfig": page.planarconfig if page.samplesperpixel > 1 else None,
        "extrasamples": page.extrasamples or None,
        "subfiletype": page.subfiletype,
        "description": tags["ImageDescription"].value if "ImageDescription" in tags else None,
        "software": tags["Software"].value if "Software" in tags else False,
        "metadata": None,
    }
    if "XResolution" in tags and "YResolution" in tags:
        keywords["resolution"] = (tags["XResolution"].value, tags["YResolution"].value)
        keywords["resolutionunit"] = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
    extratags = []
    for tag in tags:
        if tag.code not in KEPT_TAGS:
            continue
        if int(tag.dtype) in RAW_TYPES:
            handle.seek(tag.valueoffset)
            value: Any = handle.read(tag.valuebytecount)
        else:
            value = tag.value
        extratags.append((tag.code, int(tag.dtype), tag.count, value, True))
    keywords["extratags"] = extratags
    return keywords


def _write(path: Path, pages: list[tuple[np.ndarray, dict[str, Any]]]) -> None:
    """Lay the file out with tifffile (headers and tags; pixels left sparse), then write each page's pixels.

    The pixels go through plain ``pwrite`` calls, so that a full disk is an
    OSError with its errno (tifffile reports a short write without one).
    """
    nbytes = sum(data.nbytes for data, _ in pages)
    with tifffile.TiffWriter(path, bigtiff=nbytes > BIGTIFF_ABOVE) as writer:
        laid_out = [writer.write(shape=d.shape, dtype=d.dtype, returnoffset=True, **k) for d, k in pages]
    if any(where is None or where[1] != data.nbytes for where, (data, _) in zip(laid_out, pages, strict=True)):
        raise ScrollzarrError(f"tifffile did not lay {path} out contiguously; cannot write its pixels")
    fd = os.open(path, os.O_WRONLY)
    try:
        for (data, _), (offset, _) in zip(pages, laid_out, strict=True):
            write_at(fd, data, offset)
    finally:
        os.close(fd)


def _not_a_finished_copy(source: Path, target: Path) -> str | None:
    """Why ``target`` is not an uncompressed copy of ``source`` (headers compared), or ``None`` if it is."""
    with _reading(source), tifffile.TiffFile(source) as tiff:
        expected = [(p.shape, p.dtype) for p in tiff.pages]
    try:
        with tifffile.TiffFile(target) as tiff:
            pages = list(tiff.pages)
            found = [(p.shape, p.dtype) for p in pages]
            compressed = any(p.compression != NO_COMPRESSION for p in pages)
            _check_length(target, pages)
    except SourceError:
        return "is truncated"
    except Exception:  # any file tifffile cannot read is not one of ours
        return "is not a readable TIFF"
    if found != expected:
        return f"holds {len(found)} image(s) of another shape or type"
    if compressed:
        return "is compressed"
    return None


def _verify(source: Path, target: Path, decoded: list[np.ndarray] | None = None) -> bool:
    """Read ``target`` back (memory-mapped where it is a single image) and compare its pixels with ``source``'s."""
    if decoded is None:
        with _reading(source), tifffile.TiffFile(source) as tiff:
            decoded = [page.asarray(maxworkers=1) for page in tiff.pages]
    with tifffile.TiffFile(target) as tiff:
        pages = list(tiff.pages)
        written = [tifffile.memmap(target)] if len(pages) == 1 else [p.asarray() for p in pages]
    if len(written) != len(decoded) or not all(np.array_equal(a, b) for a, b in zip(written, decoded, strict=True)):
        raise SourceError(
            f"{source.name}: verification failed: the pixels of its output differ from it; "
            "run again with --overwrite to write it again"
        )
    return True


def remove_stale_partials(output_dir: Path, names: set[str]) -> int:
    """Delete the temporary files a killed run left for these names; return how many."""
    removed = 0
    for name in names:
        partial = hidden_partial_path(output_dir / name)
        if partial.exists():
            partial.unlink()
            removed += 1
    return removed


def decompress_tiffs(
    input_dir: Path, output_dir: Path, overwrite: bool, workers: int | None, verify: bool, quiet: bool
) -> DecompressReport:
    """Decompress every TIFF of ``input_dir`` into ``output_dir``.

    Raises
    ------
    ScrollzarrError
        For unusable directories; and, after every other file is done, if
        any file failed (each is listed by a warning as it fails).
    """
    if workers is not None:
        check_workers(workers)
    check_directories(input_dir, output_dir)
    keep_freed_memory()
    files = list_tiffs(input_dir)
    if not files:
        raise ScrollzarrError(f"no .tif or .tiff files in {input_dir}")
    with OutputLock(output_dir, "output directory") as lock:
        report = _decompress_all(files, output_dir, overwrite, workers or available_cores(), verify, quiet)
        fsync_directories(directory.parent for directory in lock.created)
    if report.failures:
        log.info(report.summary())
        names = [r.name for r in report.failures]
        listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ScrollzarrError(
            f"{len(report.failures)} of {len(files)} files failed ({listed}; reasons above); "
            "the others are done: fix or remove those files and run the same command again"
        )
    return report


def _decompress_all(
    files: list[Path], output_dir: Path, overwrite: bool, workers: int, verify: bool, quiet: bool
) -> DecompressReport:
    """Decompress ``files`` into ``output_dir`` (held by this run) in their order, each reported as it is done."""
    stale = remove_stale_partials(output_dir, {f.name for f in files})
    if stale:
        log.info(f"removed {stale} temporary file(s) of an interrupted run")
    report = DecompressReport(output_dir)
    started = time.perf_counter()
    sizes = [_file_size(f) for f in files]
    bar = progress(sum(sizes), "B", "decompressing", quiet)
    # Files are handed out and reported in slice-number order, two per worker in flight, so that every
    # worker stays busy while the oldest file is awaited.
    window = 2 * workers
    pending: deque[tuple[int, Future[FileResult]]] = deque()

    def report_oldest() -> None:
        index, future = pending.popleft()
        result = future.result()
        report.results.append(result)
        if result.error:
            log.warning(result.error)
        bar.update(sizes[index])
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{len(report.results)}/{len(files)} files, {len(report.results) / elapsed:.1f} files/s")

    with Workers(workers, processes=True, preload=[__name__]) as pool, bar:
        for index, source in enumerate(files):
            pending.append((index, pool.submit(decompress_file, source, output_dir / source.name, overwrite, verify)))
            if len(pending) >= window:
                report_oldest()
        while pending:
            report_oldest()
    # The renames into the directory are flushed once, before the run says it is done; a power cut before
    # this loses at most finished files, whose data was flushed, and a rerun writes them again.
    fsync_path(output_dir)
    report.seconds = time.perf_counter() - started
    return report
