"""Keep freed memory in the C heap for reuse, instead of handing it back to the kernel at once (glibc).

numpy's temporaries of a few hundred KiB to a few MiB are by default mapped
fresh from the kernel and unmapped when freed, so every new one costs a page
fault per 4 KiB touched.  A render allocates such temporaries for every
group of samples: measured on the benchmark's segment, 2.7 million page
faults and a third of the CPU time in the kernel.  Raising glibc's mmap and
trim thresholds keeps those blocks in the heap, where the next temporary
reuses them (0.3 million faults).  Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20  # free memory kept at the heap's top before it is returned


def keep_freed_memory() -> bool:
    """Raise glibc's thresholds; ``False`` where there is no glibc ``mallopt``."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
