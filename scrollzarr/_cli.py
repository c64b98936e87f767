"""What every command-line script shares: logging set-up, signals, and turning errors into one line."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from scrollzarr.errors import ScrollzarrError

EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2), pointing to ``--help``.

    ``--help`` shows each option's default where it says something (see :class:`HelpFormatter`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in ``--help`` where it says something (not for None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def setup_logging(program: str, quiet: bool, verbose: bool) -> None:
    """Send the package's messages to stderr as ``program: message`` lines.

    ``quiet`` keeps warnings and errors only; ``verbose`` adds debug detail.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{program}: %(message)s"))
    root = logging.getLogger("scrollzarr")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    # tifffile logs what it finds wrong in a damaged file; the package reports such files itself, in one line.
    tifffile_log = logging.getLogger("tifffile")
    tifffile_log.handlers[:] = [handler] if verbose else [logging.NullHandler()]
    tifffile_log.propagate = False
    # The libraries' own warnings (zarr's about metadata quirks, say) are one line like the tools' messages,
    # and silenced by ``quiet``, which keeps only the tools' warnings and errors.
    if quiet:
        warnings.simplefilter("ignore")
    else:
        warnings.showwarning = _show_warning


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """Show a library's warning as one ``program: Category: message`` line (not its source file and line)."""
    logging.getLogger("scrollzarr.warnings").warning(f"{category.__name__}: {message}")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--verbose``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar or summary; warnings and errors only"
    )
    group.add_argument("--verbose", "-v", action="store_true", help="also print debugging detail")


def add_workers(parser: argparse.ArgumentParser, what: str) -> None:
    """``--workers N`` (with ``--num_threads``, as upstream users type it); ``what`` the workers do."""
    parser.add_argument(
        "--workers",
        "--num_threads",
        "--num-threads",
        type=int,
        default=None,
        help=f"{what} (default: one per core)",
    )


def add_disk_cache(parser: argparse.ArgumentParser, what: str) -> None:
    """``--cache_dir`` and ``--cache_gb``: the disk cache of remote objects, shared by the scripts; ``what`` is kept
    there."""
    parser.add_argument(
        "--cache_dir",
        "--cache-dir",
        type=Path,
        default=None,
        help=f"{what}: where fetched files are kept, also for later runs (default $XDG_CACHE_HOME/scrollzarr, "
        "else ~/.cache/scrollzarr)",
    )
    parser.add_argument(
        "--cache_gb",
        "--cache-gb",
        type=float,
        default=20.0,
        help=f"{what}: bound on the disk cache, in GB (GiB), least recently used out first; 0: no disk cache",
    )


# Where a Dask scheduler is named when --scheduler is not given (dask's own variable for it).
SCHEDULER_VARIABLE = "DASK_SCHEDULER_ADDRESS"


def add_scheduler(parser: argparse.ArgumentParser, what: str) -> None:
    """``--scheduler ADDRESS``: run ``what`` on a Dask cluster."""
    parser.add_argument(
        "--scheduler",
        default=None,
        help=f"run {what} on a Dask cluster: tcp://HOST:PORT, a scheduler file (dask scheduler --scheduler-file), "
        f"or local:N for N worker processes on this machine (default: ${SCHEDULER_VARIABLE} if set, else "
        'this machine\'s threads); needs pip install "scrollzarr[dask]"',
    )


def scheduler_address(given: str | None) -> str | None:
    """The scheduler to use: ``--scheduler``, else :data:`SCHEDULER_VARIABLE` from the environment, else none."""
    return given or os.environ.get(SCHEDULER_VARIABLE) or None


def rerun_command(argv: list[str] | None, *extra: str) -> str:
    """The command line that continues this run: the same one without ``--overwrite``, plus ``extra`` words.

    ``argv`` is the arguments given to the script's ``main`` (``None``: those of this process).
    """
    words = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--overwrite"]
    words += [word for word in extra if word not in words]
    program = sys.argv[0]
    command = [sys.executable, program] if program.endswith(".py") else [Path(program).name]
    return shlex.join([*command, *words])


def _os_error(error: OSError, resume: str | None) -> str:
    where = f" ({error.filename})" if error.filename else ""
    then = f"; then continue with: {resume}" if resume else ""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free some space{then}"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {error.strerror}; make the output writable{then}"
    return f"{error.strerror or error}{where}{then}"


def _continue_command(resume: Callable[[], str | None] | None) -> str | None:
    """``resume()``, or ``None`` where it cannot be worked out.

    A stop can come at any instant, also in the middle of importing a module the
    answer needs (SIGTERM during ``import zarr`` leaves it half-initialised, and
    importing it again fails): nothing is written then, and the stop is reported
    without a command instead of as a traceback.
    """
    if resume is None:
        return None
    try:
        return resume()
    except Exception:
        return None


def run(program: str, body: Callable[[], None], resume: Callable[[], str | None] | None = None) -> int:
    """Call ``body``; map a :class:`ScrollzarrError`, an OSError or Ctrl-C/SIGTERM to stderr lines and an exit code.

    Parameters
    ----------
    resume : callable or None
        Asked when the work stops half-way: the command that continues it, shown to the user, or ``None``
        when the output holds nothing to continue (the run stopped before writing anything).
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        body()
    except ScrollzarrError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as interrupt:
        command = _continue_command(resume)
        then = f"; to continue: {command}" if command else ""
        print(f"{program}: interrupted{then}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except OSError as error:
        print(f"{program}: error: {_os_error(error, _continue_command(resume))}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
