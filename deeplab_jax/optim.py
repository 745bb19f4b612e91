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
  """The optimizer of `config.optim`, and its schedule.

  `optim.name`: `sgd` (momentum, PyTorch-style coupled weight decay),
  `adam` (coupled L2, as `torch.optim.Adam(weight_decay=...)`) or `adamw`
  (decoupled). `optim.grad_accum_steps > 1` accumulates gradients
  (optax.MultiSteps).
  """
  o = config
  schedule = poly_schedule(
    o.lr,
    num_steps,
    power=o.poly_power,
    warmup_steps=o.warmup_steps,
    end_lr=o.end_lr,
  )
  decay = optax.add_decayed_weights(o.weight_decay, mask=decay_mask)
  if o.name == 'sgd':
    tx = optax.chain(decay, optax.sgd(schedule, momentum=o.momentum))
  elif o.name == 'adam':
    tx = optax.chain(decay, optax.adam(schedule))
  elif o.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=o.weight_decay, mask=decay_mask)
  else:
    raise ConfigError(f'optim.name must be sgd, adam or adamw, not {o.name!r}')
  if o.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx, schedule


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """`ema = decay * ema + (1 - decay) * params`."""
  return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
