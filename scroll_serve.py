#!/usr/bin/env python3
"""scroll_serve: view a store, or a folder of stores, in Neuroglancer; or proxy a password-protected data server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scrollzarr import commands
from scrollzarr._cli import Parser, add_disk_cache, add_verbosity, run, setup_logging

PROGRAM = "scroll_serve"


def _path(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("PATH is empty; give a zarr store or a folder of stores (. for this one)")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROGRAM,
        description="Serve PATH (an OME-Zarr store, or a folder of stores) read-only over HTTP for Neuroglancer, "
        "with byte ranges and CORS, and print for each store a link that opens it in Neuroglancer; or, with "
        "--proxy, serve a remote data server's files on this machine, logged in (~/.netrc, or --user), retried "
        "when it is busy, and cached on disk. Ctrl-C stops it.",
    )
    parser.add_argument("path", type=_path, nargs="?", help="a zarr store, or a folder of stores, to serve")
    parser.add_argument(
        "--proxy", metavar="URL", default=None, help="serve the files under this http(s):// address instead of PATH"
    )
    parser.add_argument(
        "--user",
        default=None,
        help="--proxy: the user name to log in with, where ~/.netrc has no entry for the server; the password "
        "comes from SCROLLZARR_HTTP_PASSWORD, else a prompt (never the command line)",
    )
    parser.add_argument("--port", type=int, default=9000, help="the port to listen on (0: any free port)")
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        help="the address to listen on; the default lets only this machine in (0.0.0.0: every machine that "
        "reaches this one)",
    )
    parser.add_argument("--open", action="store_true", help="open the (first) Neuroglancer link in the browser")
    parser.add_argument(
        "--neuroglancer",
        metavar="URL",
        default=None,
        help="the Neuroglancer app the links open (default: the public one, neuroglancer-demo.appspot.com)",
    )
    add_disk_cache(parser, "--proxy")
    parser.add_argument(
        "--log_requests", "--log-requests", action="store_true", help="print a line for every request answered"
    )
    add_verbosity(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.path is None) == (args.proxy is None):
        parser.error("give PATH to serve, or --proxy URL, not both")
    if args.proxy is None and args.user is not None:
        parser.error("--user is the login for --proxy's server; PATH is served without one")
    setup_logging(PROGRAM, args.quiet, args.verbose)
    return run(
        PROGRAM,
        lambda: commands.scroll_serve(
            args.path,
            args.proxy,
            args.user,
            args.cache_dir,
            args.cache_gb,
            bind=args.bind,
            port=args.port,
            app=args.neuroglancer,
            open_browser=args.open,
            log_requests=args.log_requests,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
