#!/usr/bin/env python3
"""scroll_to_ome: a directory of z-slice TIFFs becomes a multi-resolution OME-Zarr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scrollzarr import commands, presets
from scrollzarr._cli import (
    Parser,
    add_scheduler,
    add_verbosity,
    add_workers,
    rerun_command,
    run,
    scheduler_address,
    setup_logging,
)
from scrollzarr.downsample import ALGORITHMS, GAUSSIAN_SIGMA
from scrollzarr.layout import COMPRESSORS
from scrollzarr.presets import PRESETS
from scrollzarr.storage import parse_location
from scrollzarr.tiffstack import BAD_SLICE_POLICIES

PROGRAM = "scroll_to_ome"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROGRAM,
        description="Convert a directory of z-slice TIFFs (00000.tif, 00001.tif, ...) into a "
        "multi-resolution OME-Zarr (NGFF 0.4 on zarr format 2, or NGFF 0.5 on zarr format 3) for Neuroglancer "
        "and khartes.",
    )
    parser.add_argument("input_tiff_dir", type=Path, help="directory of TIFFs named by slice number")
    parser.add_argument(
        "output",
        help="output store, a path or s3://BUCKET/PREFIX.zarr (with --scheduler; endpoint and credentials from "
        "the environment, as for the AWS tools); the name must end in .zarr",
    )
    parser.add_argument(
        "--chunk_size",
        "--chunk-size",
        type=int,
        default=None,
        help="edge of the cubic chunks, the same at every level (default 128; with "
        "--first_new_level, that of the level above)",
    )
    parser.add_argument(
        "--nlevels",
        type=int,
        default=None,
        help="resolution levels including full resolution; each halves every axis (default: 6)",
    )
    parser.add_argument(
        "--max_gb",
        "--max-gb",
        type=float,
        default=None,
        help="bound on the memory the conversion uses, in GB (default: what one chunk "
        "row of whole slices needs, about chunk_size x one TIFF)",
    )
    parser.add_argument(
        "--zarr_only",
        "--zarr-only",
        action="store_true",
        help="write one plain zarr array at full resolution instead of an OME-Zarr",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (only a zarr store or an empty directory)"
    )
    parser.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default="mean",
        help="downsampling: mean of each 2x2x2 block rounded to nearest, its first voxel "
        f"(nearest), its maximum (max), or Gaussian smoothing with sigma {GAUSSIAN_SIGMA:.3f} "
        "voxels then subsampling (gaussian)",
    )
    parser.add_argument(
        "--ranges",
        default=None,
        help="crop, as x,y,z Python slices without step: e.g. 1000:2000,1500:4000,2000:7000 "
        "or 100:600,, (empty = whole axis); x = TIFF column, y = row, z = slice number",
    )
    parser.add_argument(
        "--first_new_level",
        "--first-new-level",
        type=int,
        default=None,
        help="rebuild levels N and up of an existing OME-Zarr from level N-1; the TIFF directory is not read",
    )
    parser.add_argument(
        "--obytes",
        type=int,
        choices=(0, 1),
        default=None,
        help="output bytes per voxel: 0 = as the input, 1 = uint8 (uint16 // 256, or by --window) (default: 0)",
    )
    parser.add_argument(
        "--window",
        default=None,
        help="with uint8 output: LOW:HIGH maps uint16 LOW to 0 and HIGH to 255, linear, rounded to nearest, "
        "clipped; auto takes LOW and HIGH from the 0.1 and 99.9 percentiles of a fixed sample of the input",
    )
    parser.add_argument(
        "--zarr_format",
        "--zarr-format",
        type=int,
        default=None,
        help="2: OME-NGFF 0.4 on zarr format 2; 3: OME-NGFF 0.5 on zarr format 3 (default: 2)",
    )
    parser.add_argument(
        "--shard_shape",
        "--shard-shape",
        default=None,
        help="Z,Y,X: shards of that many voxels, each a multiple of --chunk_size (zarr format 3 only; "
        "default: no shards)",
    )
    parser.add_argument(
        "--compressor",
        default=None,
        help=f"chunk compression: {', '.join(COMPRESSORS)} (default: none)",
    )
    parser.add_argument(
        "--clevel", type=int, default=None, help="compression level (default: the compressor's, see the README)"
    )
    parser.add_argument(
        "--preset",
        default=None,
        help=f"a named bundle of the options above: {', '.join(PRESETS)} (see the README); options given beside it win",
    )
    add_workers(
        parser,
        "worker threads for reading, decoding, downsampling and writing (with --scheduler: threads per task, 1 by "
        "default)",
    )
    add_scheduler(parser, "the conversion (or --first_new_level)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a conversion that stopped (Ctrl-C, kill, power cut, full disk) where it stopped; "
        "give the same options as the stopped run",
    )
    parser.add_argument(
        "--bad_slices",
        "--bad-slices",
        choices=BAD_SLICE_POLICIES,
        default="error",
        help="a slice that cannot be read: stop with an error listing every such slice, or write it as "
        "zeros and record it in the store",
    )
    parser.add_argument(
        "--dry_run",
        "--dry-run",
        action="store_true",
        help="print the plan (shapes, chunks, size, memory) and exit without writing",
    )
    add_verbosity(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROGRAM, args.quiet, args.verbose)

    def body() -> None:
        given = {name: getattr(args, name) for name in presets.OPTION_NAMES} | {
            "scheduler": scheduler_address(args.scheduler)
        }
        options = presets.resolve(args.preset, given, rebuild=args.first_new_level is not None)
        output = parse_location(args.output)
        commands.scroll_to_ome(
            args.input_tiff_dir, output, options, args.first_new_level, args.chunk_size, args.dry_run
        )

    def resume() -> str | None:
        """``--resume`` once the store holds a progress record (a run that wrote nothing has none to resume)."""
        if args.dry_run or not commands.is_resumable(parse_location(args.output)):
            return None
        return rerun_command(argv, "--resume")

    return run(PROGRAM, body, resume)


if __name__ == "__main__":
    sys.exit(main())
