"""Timing shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts this folder on the path)."""

import time


def best_seconds(fn, repeats: int) -> float:
    """The least of `repeats` timed calls of `fn` after one warm-up call: the least noisy estimate of a CPU-bound
    cost on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
