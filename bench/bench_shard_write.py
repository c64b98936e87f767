"""Writing one shard: scrollzarr's ShardSink against zarr-python's own sharding codec, in one run.

One 128 x 1024 x 1024 uint16 shard of the synthetic scroll, written into a fresh zarr 3 array
(chunks 128^3) uncompressed, with blosc-zstd 3 and with blosc-lz4 5, alternately by
``ShardSink.write`` and by ``array[...] = data`` with zarr's defaults; each result read back
with zarr and compared.  Prints the best of ``--repeats`` for each, in ms.

Usage: python bench/bench_shard_write.py [--repeats N] [--dir DIRECTORY]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from scrollzarr import allocator  # noqa: F401  (the heap settings the scripts run with)
from scrollzarr.layout import StoreLayout
from scrollzarr.sinks import SinkSpec, open_sink
from scrollzarr.synthetic import scroll_slice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: the system's temporary dir)")
    args = parser.parse_args()
    volume = np.stack([scroll_slice(z, (1024, 1024), 128, False) for z in range(128)])
    print(f"one shard of {volume.shape} uint16, {volume.nbytes / 2**20:.0f} MiB; best of {args.repeats}, ms")
    for compressor in ("none", "blosc-zstd", "blosc-lz4"):
        layout = StoreLayout(3, 128, (128, 1024, 1024), compressor)
        times: dict[str, list[float]] = {"scrollzarr": [], "zarr": []}
        for _ in range(args.repeats):
            for who in times:
                directory = Path(tempfile.mkdtemp(dir=args.dir))
                try:
                    layout.create_array(str(directory / "a"), None, volume.shape, np.dtype("uint16"))
                    start = time.perf_counter()
                    if who == "scrollzarr":
                        open_sink(SinkSpec(directory / "a", volume.shape, "uint16", layout)).write((0, 0, 0), volume)
                    else:
                        zarr.open_array(str(directory / "a"), mode="r+")[...] = volume
                    times[who].append(time.perf_counter() - start)
                    if not np.array_equal(zarr.open_array(str(directory / "a"), mode="r")[...], volume):
                        raise SystemExit(f"benchmark: {who}'s shard does not read back")
                finally:
                    shutil.rmtree(directory)
        ours, theirs = (min(values) * 1000 for values in times.values())
        print(f"  {compressor:10s}  scrollzarr {ours:6.0f}   zarr {theirs:6.0f}   ratio {ours / theirs:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
