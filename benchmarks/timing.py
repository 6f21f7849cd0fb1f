"""The benchmarks' one timing rule: median wall and process CPU time over repeated calls, after one warm-up.

On a shared box the wall time is inflated by other jobs; the process CPU time (summed over threads) is not, so
every benchmark reports both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_times(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process-CPU seconds) of ``repeats`` calls of ``fn()`` after one warm-up call.
    ``fn`` must block until its work is done (e.g. wrap JAX calls in ``jax.block_until_ready``)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)
