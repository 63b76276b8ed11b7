"""Timing helper shared by the microbenchmarks: speed-ups from back-to-back pairs (robust on a shared CPU)."""

from __future__ import annotations

import statistics
import time


def interleaved_speedup(reference, fast, pairs: int = 9) -> tuple[float, float, float]:
    """(median, p20, p80) over `pairs` of t_reference / t_fast, the two timed back to back."""
    reference(), fast()
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        reference()
        t1 = time.perf_counter()
        fast()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    ratios.sort()
    return statistics.median(ratios), ratios[int(0.2 * (pairs - 1))], ratios[int(round(0.8 * (pairs - 1)))]
