"""Pixel-wise softmax cross-entropy with an ignore label."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deeplab_jax.data.labels import IGNORE


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`[B, H, W, K]` float logits, `[B, H, W]` int labels -> `[B, H, W]`
  losses (0 where the label is ignored or out of range)."""
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  valid = (labels >= 0) & (labels < k)
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0)


def cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  *,
  class_weights: jax.Array | None = None,
  ohem_thresh: float | None = None,
  ohem_min_kept: int = 100_000,
) -> jax.Array:
  """Mean cross-entropy over the valid pixels of the whole (global) batch.

  Args:
    logits: `[B, H, W, K]`.
    labels: `[B, H, W]` class ids; `IGNORE` (255) and any id outside
      `[0, K)` are left out of sum and count.
    class_weights: optional `[K]`; the mean is weighted as PyTorch's
      `CrossEntropyLoss(weight=...)` (sum of w*l / sum of w).
    ohem_thresh: online hard example mining (mmsegmentation's
      OHEMPixelSampler): keep pixels whose true-class probability is below
      this, and at least the `ohem_min_kept` hardest.

  Returns:
    Scalar float32 loss. Under `jax.jit` with the batch sharded over a mesh
    the sums are global, so every device gets the same global mean.
  """
  k = logits.shape[-1]
  nll = pixel_cross_entropy(logits, labels)
  valid = ((labels >= 0) & (labels < k) & (labels != IGNORE)).astype(
    jnp.float32
  )
  weight = valid
  if class_weights is not None:
    safe = jnp.clip(labels, 0, k - 1)
    weight = weight * jnp.asarray(class_weights, jnp.float32)[safe]
  if ohem_thresh is not None:
    hard = nll > -jnp.log(ohem_thresh)
    flat = jnp.where(valid > 0, nll, -1.0).reshape(-1)
    kept = min(ohem_min_kept, flat.shape[0])
    kth = jax.lax.top_k(flat, kept)[0][-1]
    keep = hard | (nll >= kth)
    weight = weight * keep.astype(jnp.float32)
  return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
