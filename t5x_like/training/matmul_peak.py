"""The measured matmul peak that MFU divides by.

The model FLOPs it is compared with belong to each model (`flops_per_example`, models/flops.py).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5, min_seconds: float = 0.0) -> float:
    """FLOP/s of a large square matmul on the default device: the achievable peak MFU is judged by.

    Best of at least `repeats` runs and `min_seconds` of them: on a shared or frequency-scaling
    host a few samples can land in a slow moment and understate the peak (overstating MFU).
    """
    a = jnp.ones((size, size), dtype)
    # Low-precision inputs with a float32 result: the fast path the layers use (layers/dense.py).
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best, runs, deadline = float("inf"), 0, time.perf_counter() + min_seconds
    while runs < repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
        runs += 1
    # Fake CPU devices share the host's cores, so only accelerators add up.
    devices = 1 if jax.default_backend() == "cpu" else jax.device_count()
    return 2 * size ** 3 / best * devices
