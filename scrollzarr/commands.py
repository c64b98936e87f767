"""What each command-line script does, once its arguments are parsed.

Each command imports what it uses when it runs, so that a script starts
without loading the others' dependencies (zarr, for one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scrollzarr.cluster import DaskExecutor
    from scrollzarr.layers import LayerOptions
    from scrollzarr.options import Options
    from scrollzarr.storage import Location

log = logging.getLogger(__name__)


def scroll_to_ome(
    input_dir: Path,
    output: Location,
    options: Options,
    first_new_level: int | None = None,
    chunk_size: int | None = None,
    dry_run: bool = False,
) -> None:
    """Everything ``scroll_to_ome`` does: plan, then print the plan or carry it out.

    Parameters
    ----------
    output : Path or ObjectStore
        The store: a directory, or a prefix in an S3 bucket.
    first_new_level : int or None
        Rebuild levels from this one on in the existing store ``output``
        instead of converting ``input_dir``.
    chunk_size : int or None
        The chunk size the user gave, if any (a rebuild otherwise keeps the store's).
    dry_run : bool
        Print the plan on stdout and write nothing.
    """
    from scrollzarr import pipeline, rebuild
    from scrollzarr.errors import ScrollzarrError, UsageError
    from scrollzarr.outputlock import OutputLock
    from scrollzarr.storage import ObjectStore
    from scrollzarr.store import check_output_name

    if isinstance(output, ObjectStore) and first_new_level is not None:
        raise UsageError(
            f"--first_new_level rebuilds a store on a file system, not {output}; copy the store to a shared "
            "file system (aws s3 sync), rebuild it there and copy it back"
        )
    if dry_run:
        with _cluster(options) as executor:
            cut = (1, 1) if executor is None else (executor.slots, executor.parallel)
            if first_new_level is not None:
                assert isinstance(output, Path)  # refused above
                plan = rebuild.plan_rebuild(output, first_new_level, options, chunk_size, *cut)
                print(rebuild.describe_rebuild(plan))
            else:
                print(pipeline.describe_plan(pipeline.plan_conversion(input_dir, output, options, *cut)))
        return

    def work() -> None:
        with _cluster(options) as executor:
            cut = (1, 1) if executor is None else (executor.slots, executor.parallel)
            if first_new_level is not None:
                assert isinstance(output, Path)  # refused above
                plan = rebuild.plan_rebuild(output, first_new_level, options, chunk_size, *cut)
                log.info(rebuild.rebuild_levels(plan, executor).summary())
            else:
                conversion = pipeline.plan_conversion(input_dir, output, options, *cut)
                log.info(pipeline.convert(conversion, executor).summary())

    check_output_name(output)
    if isinstance(output, ObjectStore):
        # no lock in a bucket (S3 has no lock that a killed run releases): one run per prefix is the user's to keep
        work()
        return
    if options.scheduler is not None:  # the workers do not share this process's working directory
        input_dir, output = input_dir.absolute(), output.absolute()
    if options.resume and not output.exists() and not output.is_symlink():
        # checked before the lock makes the directory: a lock file alone is what a run killed early leaves
        raise ScrollzarrError(f"nothing to resume: {output} does not exist; run without --resume")
    if output.exists() and not output.is_dir():
        work()  # planning refuses a file (it is never written over), which could not hold the lock anyway
        return
    # One run per store, from before the output is looked at (so that what is planned stays true) to the end.
    with OutputLock(output, "output store"):
        work()


@contextmanager
def _cluster(options: Options) -> Iterator[DaskExecutor | None]:
    """The Dask cluster of ``--scheduler``, connected; ``None`` without one (dask is then not imported)."""
    if options.scheduler is None:
        yield None
        return
    from scrollzarr.cluster import DaskExecutor

    with DaskExecutor(options.scheduler, options.worker_count) as executor:
        yield executor


def ppm_to_layers(
    ppm_path: Path,
    zarr_path: Path | str,
    output_dir: Path,
    stack_path: Path | None,
    options: LayerOptions,
    merge: bool = False,
) -> None:
    """Everything ``ppm_to_layers`` does: render the layers (and stacked image), or with ``merge`` join the parts
    of a render, then print a summary."""
    if merge:
        from scrollzarr import layermerge

        log.info(layermerge.merge_parts(ppm_path, zarr_path, output_dir, stack_path, options))
        return
    from scrollzarr import layers

    log.info(layers.ppm_to_layers(ppm_path, zarr_path, output_dir, stack_path, options).summary())


def decompress_tiffs(
    input_dir: Path, output_dir: Path, overwrite: bool, workers: int | None, verify: bool, quiet: bool
) -> None:
    """Everything ``decompress_tiffs`` does: decompress the directory, then print a summary."""
    from scrollzarr import decompress

    log.info(decompress.decompress_tiffs(input_dir, output_dir, overwrite, workers, verify, quiet).summary())


def has_decompressed(input_dir: Path, output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a file under an input TIFF's name, so that running again continues a run."""
    from scrollzarr import decompress

    return decompress.has_output(input_dir, output_dir)


def is_resumable(output: Location) -> bool:
    """Whether ``output`` holds scroll_to_ome's progress record: a stopped conversion that ``--resume`` continues."""
    from scrollzarr import progress

    return progress.exists(output)


def scroll_serve(
    path: Path | None,
    proxy: str | None,
    user: str | None,
    cache_dir: Path | None,
    cache_gb: float,
    **options: Any,
) -> None:
    """Everything ``scroll_serve`` does: serve ``path``, or with ``proxy`` the files of that server, until stopped;
    ``options`` are :class:`scrollzarr.serve.ServeOptions`'."""
    from scrollzarr import serve
    from scrollzarr.remote import cache_settings

    settings = serve.ServeOptions(**{name: value for name, value in options.items() if value is not None})
    if proxy is not None:
        serve.serve_proxy(proxy, user, cache_settings(cache_dir, cache_gb), settings)
    else:
        assert path is not None
        serve.serve_folder(path, settings)
