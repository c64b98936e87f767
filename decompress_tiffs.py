#!/usr/bin/env python3
"""decompress_tiffs: batch-decompress a directory of compressed TIFFs (e.g. masked_volumes) so they read fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scrollzarr import commands
from scrollzarr._cli import Parser, add_verbosity, add_workers, rerun_command, run, setup_logging

PROGRAM = "decompress_tiffs"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROGRAM,
        description="Write every .tif/.tiff of INPUT_TIFF_DIR to OUTPUT_TIFF_DIR under the same name, "
        "uncompressed and contiguous (memory-mappable), with the same pixels and meaningful tags. "
        "Files already uncompressed are copied. Running the same command again after an interruption "
        "skips the files that are finished.",
    )
    parser.add_argument("input_tiff_dir", type=Path, help="directory of compressed TIFFs")
    parser.add_argument("output_tiff_dir", type=Path, help="directory for the uncompressed TIFFs (created if missing)")
    parser.add_argument(
        "--overwrite", action="store_true", help="rewrite every output file, also those finished by an earlier run"
    )
    add_workers(parser, "files decoded at a time")
    parser.add_argument(
        "--verify", action="store_true", help="read each output back and check its pixels equal the input's"
    )
    add_verbosity(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROGRAM, args.quiet, args.verbose)

    def resume() -> str | None:
        """The command that continues, once some file is written (finished files are then skipped)."""
        if not commands.has_decompressed(args.input_tiff_dir, args.output_tiff_dir):
            return None
        return f"{rerun_command(argv)} (finished files are skipped)"

    return run(
        PROGRAM,
        lambda: commands.decompress_tiffs(
            args.input_tiff_dir, args.output_tiff_dir, args.overwrite, args.workers, args.verify, args.quiet
        ),
        resume,
    )


if __name__ == "__main__":
    sys.exit(main())
