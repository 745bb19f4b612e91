"""One timing rule for every benchmark row, and peak memory."""

from __future__ import annotations

import resource
import time

import jax
import numpy as np


def median_seconds(fn, steps: int) -> tuple[float, float]:
  """`(median seconds per call over `steps` calls, seconds of the warm-up
  call before them)`. `fn`'s result is waited for (`block_until_ready`; a
  PyTorch step synchronises itself and returns None)."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times)), first


def peak_mem_mb() -> float:
  """The first device's peak bytes in use (MiB), or this process's peak
  resident memory where the device keeps no count (XLA:CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
