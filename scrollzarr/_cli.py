"""What every command-line script shares: logging set-up and turning errors into one line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from scrollzarr.errors import ScrollzarrError

EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2), pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


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


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--verbose``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar or summary; warnings and errors only"
    )
    group.add_argument("--verbose", "-v", action="store_true", help="also print debugging detail")


def run(program: str, body: Callable[[], None]) -> int:
    """Call ``body``; map a :class:`ScrollzarrError` or Ctrl-C to one stderr line and an exit code."""
    try:
        body()
    except ScrollzarrError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:
        print(f"{program}: error: {error.strerror or error} ({error.filename or 'output'})", file=sys.stderr)
        return 1
    return 0
