#!/usr/bin/env python3
"""ppm_to_layers: flattened layer TIFFs and a stacked image from a .ppm per-pixel map and a zarr volume."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scrollzarr import commands, renderprogress
from scrollzarr._cli import (
    Parser,
    add_disk_cache,
    add_scheduler,
    add_verbosity,
    add_workers,
    rerun_command,
    run,
    scheduler_address,
    setup_logging,
)
from scrollzarr.layers import LayerOptions
from scrollzarr.remote import volume_source
from scrollzarr.sampling import DIRECTIONS, STACK_FILTERS

PROGRAM = "ppm_to_layers"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROGRAM,
        description="Sample a zarr scroll volume along the normals of a surface (a .ppm, volume-cartographer's "
        "per-pixel map, or a tifxyz folder, VC3D's) into one TIFF per layer, like vc_layers_from_ppm and "
        "vc_render_tifxyz, and optionally a stacked image, like vc_render.",
    )
    parser.add_argument(
        "ppm_file",
        type=Path,
        help="the surface: a .ppm per-pixel map, or a tifxyz folder (x.tif, y.tif, z.tif, meta.json)",
    )
    parser.add_argument(
        "zarr",
        type=volume_source,
        help="the volume: an OME-Zarr group (level 0 is sampled) or a zarr array, a directory or an https:// or "
        "s3:// URL",
    )
    parser.add_argument("output_tiff_dir", type=Path, help="directory for the layer TIFFs 00.tif, 01.tif, ...")
    parser.add_argument(
        "output_stack_tiff", type=Path, nargs="?", default=None, help="file for the stacked image (optional)"
    )
    parser.add_argument(
        "--number_of_layers",
        "--number-of-layers",
        type=int,
        default=65,
        help="layers, centred on the surface by default: layer k lies (k - (N-1)/2) x spacing voxels along the "
        "normal (see --direction)",
    )
    parser.add_argument(
        "--number_of_stacked_layers",
        "--number-of-stacked-layers",
        type=int,
        default=None,
        help="layers nearest the surface that the stacked image combines (default 25, or all layers if fewer)",
    )
    parser.add_argument(
        "--layer_spacing", "--layer-spacing", type=float, default=1.0, help="distance between layers, in voxels"
    )
    parser.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="both",
        help="where the layers lie: both sides of the surface (layer k at (k - (N-1)/2) x spacing), the positive "
        "side of the normal (k x spacing: layer 0 on the surface) or the negative side ((k - (N-1)) x spacing), "
        "as volume-cartographer's programs allow",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="tifxyz surfaces: output pixels per voxel (default 1); the grid is upsampled bilinearly to it",
    )
    parser.add_argument(
        "--flip_normals",
        "--flip-normals",
        action="store_true",
        help="sample along the surface's normals turned round (VC3D's tifxyz normals point out of the scroll)",
    )
    parser.add_argument(
        "--stack_filter",
        "--stack-filter",
        choices=STACK_FILTERS,
        default="max",
        help="how the stacked image combines its layers, per pixel (mean and median rounded to nearest)",
    )
    parser.add_argument(
        "--level",
        type=int,
        default=0,
        help="OME-Zarr level to sample (coordinates divided by 2^level), for quick previews",
    )
    add_workers(parser, "worker threads sampling the surface (with --scheduler: threads per band, 1 by default)")
    add_scheduler(parser, "the bands of the render")
    parser.add_argument(
        "--zarr_cache_max_size_gb",
        "--zarr-cache-max-size-gb",
        type=float,
        default=8.0,
        help="bound on the volume chunks kept in memory, in GB (GiB); peak memory is about this plus 1 GB",
    )
    add_disk_cache(parser, "remote volumes")
    parser.add_argument(
        "--block_size",
        "--block-size",
        type=int,
        default=128,
        help="edge of the surface tiles sampled at a time, in pixels",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the render that stopped in OUTPUT_TIFF_DIR (killed, interrupted or cut off), with the same "
        "arguments; the bands it wrote are kept",
    )
    parser.add_argument(
        "--num_parts",
        "--num-parts",
        type=int,
        default=1,
        help="render in K parts (bands of rows, K runs that may run at once on other machines): this run renders "
        "--part_id's rows into NN.partI.tif; join them with --merge_parts",
    )
    parser.add_argument(
        "--part_id",
        "--part-id",
        type=int,
        default=0,
        help="which part this run renders, 0 ... --num_parts - 1",
    )
    parser.add_argument(
        "--merge_parts",
        "--merge-parts",
        action="store_true",
        help="join the --num_parts parts rendered into OUTPUT_TIFF_DIR into the layer TIFFs (same arguments "
        "otherwise), then remove the part files",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the layer TIFFs of a non-empty OUTPUT_TIFF_DIR (other files are kept) and OUTPUT_STACK_TIFF",
    )
    add_verbosity(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROGRAM, args.quiet, args.verbose)
    options = LayerOptions(
        layers=args.number_of_layers,
        stacked=args.number_of_stacked_layers,
        spacing=args.layer_spacing,
        direction=args.direction,
        scale=args.scale,
        flip_normals=args.flip_normals,
        stack_filter=args.stack_filter,
        workers=args.workers,
        cache_gb=args.zarr_cache_max_size_gb,
        block_size=args.block_size,
        level=args.level,
        overwrite=args.overwrite,
        quiet=args.quiet,
        scheduler=scheduler_address(args.scheduler),
        cache_dir=args.cache_dir,
        disk_cache_gb=args.cache_gb,
        resume=args.resume,
        num_parts=args.num_parts,
        part_id=args.part_id,
    )

    def resume() -> str | None:
        """``--resume`` once the output directory holds a stopped render's (or this part's) record."""
        record = renderprogress.record_name(args.part_id, args.num_parts)
        stopped = not args.merge_parts and renderprogress.exists(args.output_tiff_dir, record)
        return rerun_command(argv, "--resume") if stopped else None

    return run(
        PROGRAM,
        lambda: commands.ppm_to_layers(
            args.ppm_file, args.zarr, args.output_tiff_dir, args.output_stack_tiff, options, args.merge_parts
        ),
        resume,
    )


if __name__ == "__main__":
    sys.exit(main())
