"""Process-level memory tuning for the CPU path (called by the command line, the bundles' workflows and the app).

PyTorch on the CPU allocates and frees tensors of tens of MB in every layer. glibc's ``malloc`` hands such
freed memory back to the operating system at once, so the next layer's tensor is faulted in (and zeroed) page
by page again. Keeping a pad of freed heap memory for reuse removes that and about doubled the frozen
backbone's throughput on a 2-core CPU (``python benchmarks/bench_inference.py --device cpu``; figures in
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TOP_PAD = -2  # glibc's mallopt parameter: freed memory kept at the top of the heap, in bytes
DEFAULT_TOP_PAD = 1 << 30  # measured: 256 MiB was not enough once full-size volumes are in play


def keep_freed_memory(pad_bytes: int = DEFAULT_TOP_PAD) -> bool:
    """Ask glibc's ``malloc`` to keep up to ``pad_bytes`` of freed heap memory for reuse (``M_TOP_PAD``).

    The same as ``MALLOC_TOP_PAD_`` in the environment, which wins when it is set. Returns whether the setting
    was applied: False off Linux, with another C library, or when the environment already decides.
    """
    if not sys.platform.startswith("linux") or "MALLOC_TOP_PAD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(M_TOP_PAD, int(pad_bytes)))
    logger.debug("malloc top pad %d bytes: %s", pad_bytes, "applied" if applied else "refused")
    return applied
