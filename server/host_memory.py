"""Keep a donor's resident memory close to what it holds: weights, caches, the step in flight.

glibc serves a large allocation with its own mmap and unmaps it on free, but only up to a threshold
that it raises each time such a buffer is freed (up to 32 MiB). After the first long prefill, the
prefill's activations (several MiB each) come from the heap instead, and freeing them keeps the pages:
the donor stays at its high-water mark and the next prefill adds to it. Measured with
`benchmarks/memory.py` (mid-size model, 4 sessions of 512 tokens): peak resident memory over the
baseline went from 1.18x the weights and cache budget to 1.15x with the threshold fixed at 1 MiB.

Decode steps allocate far less than 1 MiB per tensor (a 64-session batch of the mid-size model:
0.7 MiB), so they keep reusing heap memory and pay no page faults.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h
LARGE_BUFFER_BYTES = 1 << 20


def return_large_buffers_to_the_system(environ=os.environ) -> bool:
    """Fix glibc's mmap threshold at LARGE_BUFFER_BYTES, so that freed buffers at least that large go
    back to the system at once. True when set; False off glibc, or when the user chose a threshold
    with MALLOC_MMAP_THRESHOLD_ (theirs wins, and glibc read it at start-up)."""
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES) == 1
