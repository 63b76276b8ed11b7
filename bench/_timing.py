"""Timing helpers shared by the microbenchmarks: speed-ups from back-to-back pairs (robust on a shared CPU)."""

from __future__ import annotations

import statistics
import time

import torch


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


def timed_against_reference(benchmark, medians: dict, group: str, impl: str, fn, rounds: int, reference=None,
                            pairs: int = 9) -> None:
    """Time fn in the pytest-benchmark group; for a fast path also its speed-up over `reference`, twice: the ratio of
    the medians (when the reference ran first in the group) and the median of back-to-back ratios. Both are printed
    and stored in extra_info. `medians` maps (group, impl) to the medians seen so far in this module."""
    benchmark.group = group
    benchmark.extra_info.update({"impl": impl, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "device": "cpu"})
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    medians[(group, impl)] = median
    base = medians.get((group, "reference"))
    if impl == "reference" or reference is None:
        return
    interleaved, p20, p80 = interleaved_speedup(reference, fn, pairs=pairs)
    benchmark.extra_info.update({"speedup_interleaved": interleaved, "speedup_p20": p20, "speedup_p80": p80})
    line = f"\n[{group}] {impl}: {median * 1e3:.2f} ms"
    if base is not None:
        benchmark.extra_info["speedup_of_medians"] = base / median
        line += f", reference {base * 1e3:.2f} ms, ratio of medians {base / median:.2f}x"
    print(f"{line}, interleaved speed-up {interleaved:.2f}x (p20-p80 {p20:.2f}-{p80:.2f})")
