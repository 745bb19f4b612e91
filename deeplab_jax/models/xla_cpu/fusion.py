"""A fusion barrier for XLA:CPU: an exact identity that XLA computes once."""

from __future__ import annotations

import jax


def _divide_by_one(x):
  # `1 + 0 * x` is 1 for every finite x, and XLA does not fold `0 * x` for
  # floats, so this is an exact identity (non-finite values become NaN)
  # whose root is a division, which XLA will not duplicate into consumers.
  return x / (1 + 0 * x)


@jax.custom_vjp
def _fusion_barrier(x):
  return _divide_by_one(x)


def _fusion_barrier_fwd(x):
  return _divide_by_one(x), None


def _fusion_barrier_bwd(_, g):
  # The gradient of a residual stream is a chain of adds too.
  return (_divide_by_one(g),)


_fusion_barrier.defvjp(_fusion_barrier_fwd, _fusion_barrier_bwd)


def fusion_barrier(x: jax.Array) -> jax.Array:
  """`x`, unchanged, that XLA:CPU computes once instead of inside each
  consumer (and likewise its gradient).

  XLA:CPU duplicates cheap elementwise producers into every elementwise
  consumer. A residual stream (`out_k = relu(z_k + out_{k-1})`) is such a
  chain: each block's output fusion recomputed the whole stream back to the
  stage's first block, O(L^2) elementwise work. Ending the block with a
  division by one stops it (XLA does not duplicate divisions; the
  measurements are in docs/benchmarks.md). Only programs for XLA:CPU use
  it (`layers.RematBlocks.block`).
  """
  return _fusion_barrier(x)
