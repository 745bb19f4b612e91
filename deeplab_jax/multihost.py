"""Several processes (one per host): starting `jax.distributed`, and the
points where processes meet before a collective.

Why the meeting points: XLA:CPU's gloo collectives give a process a fixed
30 s (no setting in JAX 0.10) to join a collective that another process has
started for the first time; a host that is later by more than that (still
compiling, writing logs, evaluating more images) fails the run with "Gloo
context initialization failed: ... GetKeyValue() timed out". Processes that
may have drifted apart therefore first meet at a barrier of the coordination
service, whose timeout is ours.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

# A host may wait this long for a slower one (a first compile of a large
# model on a loaded machine, a long evaluation) before the run fails.
MEET_TIMEOUT_S = 1800

_meetings = itertools.count()


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Starts `jax.distributed` when flags name a coordinator or process count,
  or a cluster (SLURM, Cloud TPU) is detected; returns whether it did."""
  if not (
    coordinator_address
    or num_processes
    or any(v in os.environ for v in ('SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES'))
  ):
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
  )
  return True


def meet(name: str, timeout_s: int = MEET_TIMEOUT_S) -> None:
  """Blocks until every process has called `meet` as often as this one
  (no-op with one process). Every process must call it in the same order."""
  if jax.process_count() == 1:
    return
  key = f'deeplab_jax.{name}.{next(_meetings)}'
  ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


class CompiledOnFirstCall:
  """A jitted function whose first call compiles it, timed (`compile_s`;
  a persistent-cache hit makes it short), then meets the other processes
  before running it: compile times differ between hosts by more than the
  collectives' 30 s. Later calls are the function's own."""

  def __init__(self, fn: Callable[..., Any], name: str):
    self.fn = fn
    self.name = name
    self.compile_s: float | None = None

  def __call__(self, *args):
    if self.compile_s is None:
      start = time.perf_counter()
      self.fn.lower(*args).compile()  # cached: the call below reuses it
      self.compile_s = time.perf_counter() - start
      meet(self.name)
    return self.fn(*args)
