"""The timing both probes use: one call to compile and warm, then the median of `iters` calls,
each waited on."""
import time

import jax
import numpy as np


def median_seconds(f, iters: int, *args) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))
