"""Learning-rate schedule, optimizers with masked weight decay, EMA."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from deeplab_jax.errors import ConfigError


def poly_schedule(
  base_lr: float,
  num_steps: int,
  *,
  power: float = 0.9,
  warmup_steps: int = 0,
  warmup_ratio: float = 1e-6,
  end_lr: float = 0.0,
) -> optax.Schedule:
  """`lr = (base - end) * (1 - t / T) ** power + end` after a linear warm-up
  from `warmup_ratio * base` (mmsegmentation's PolyLR with warm-up)."""

  def schedule(step):
    t = jnp.minimum(step, num_steps).astype(jnp.float32)
    lr = (base_lr - end_lr) * (1 - t / num_steps) ** power + end_lr
    if warmup_steps:
      ramp = warmup_ratio + (1 - warmup_ratio) * t / warmup_steps
      lr = jnp.where(t < warmup_steps, lr * ramp, lr)
    return lr

  return schedule


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: conv kernels (ndim > 1), not
  BatchNorm scales/biases or conv biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
  config: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of `config.optim`, and the learning rate it applies.

  `optim.name`: `sgd` (momentum, PyTorch-style coupled weight decay),
  `adam` (coupled L2, as `torch.optim.Adam(weight_decay=...)`) or `adamw`
  (decoupled).

  `num_steps` and `optim.warmup_steps` count training steps, i.e. batches
  of `train.batch_size`. With `optim.grad_accum_steps = k > 1` the mean
  gradient of k consecutive batches is applied once (optax.MultiSteps),
  so a run makes `num_steps / k` optimizer updates (`num_steps` must be a
  multiple of k); update `u` uses the schedule's value at its first batch,
  `u * k`, so the schedule runs to its end over the run, as without
  accumulation.

  Returns:
    `(tx, lr)`: the transformation and `lr(step)`, the learning rate that
    the update containing training step `step` (0-based) applies.
  """
  o = config
  k = o.grad_accum_steps
  if k < 1 or num_steps % k:
    raise ConfigError(
      f'train.num_steps ({num_steps}) must be a multiple of '
      f'optim.grad_accum_steps ({k}): the last {num_steps % max(k, 1)} '
      'batches would never be applied'
    )
  per_batch = poly_schedule(
    o.lr,
    num_steps,
    power=o.poly_power,
    warmup_steps=o.warmup_steps,
    end_lr=o.end_lr,
  )
  # Inside MultiSteps the inner optimizer counts updates, not batches.
  per_update = per_batch if k == 1 else (lambda u: per_batch(u * k))
  decay = optax.add_decayed_weights(o.weight_decay, mask=decay_mask)
  if o.name == 'sgd':
    tx = optax.chain(decay, optax.sgd(per_update, momentum=o.momentum))
  elif o.name == 'adam':
    tx = optax.chain(decay, optax.adam(per_update))
  elif o.name == 'adamw':
    tx = optax.adamw(per_update, weight_decay=o.weight_decay, mask=decay_mask)
  else:
    raise ConfigError(f'optim.name must be sgd, adam or adamw, not {o.name!r}')
  if o.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx, lambda step: per_batch((step // k) * k)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """`ema = decay * ema + (1 - decay) * params`."""
  return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
