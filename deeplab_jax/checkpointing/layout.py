"""How a train state is laid out in a checkpoint's items, and the data
position a step records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def stringify_keys(tree: Any) -> Any:
  """Orbax stores dict keys as strings; nnx.List indices are ints."""
  if isinstance(tree, Mapping):
    return {str(k): stringify_keys(v) for k, v in tree.items()}
  return tree


def restore_keys(tree: Any, like: Any) -> Any:
  if isinstance(like, Mapping):
    return {k: restore_keys(tree[str(k)], v) for k, v in like.items()}
  return tree


def deep_merge(a: Mapping, b: Mapping) -> dict:
  """Union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for k, v in b.items():
    out[k] = deep_merge(out[k], v) if k in out else v
  return out


def split_like(tree: Mapping, template: Mapping) -> dict:
  """The part of nested dict `tree` whose paths exist in `template`."""
  return {
    k: split_like(tree[k], v) if isinstance(v, Mapping) else tree[k]
    for k, v in template.items()
  }


def data_position(
  step: int, *, seed: int, global_batch_size: int
) -> dict[str, int]:
  """A checkpoint's `data` item: the input's global position, which depends
  only on the step, the seed and the global batch."""
  return {
    'seed': seed,
    'global_batch_size': global_batch_size,
    'global_next_index': step * global_batch_size,
  }


def state_items(state: Any) -> tuple[dict, dict]:
  """`(model, train)`: how a `steps.TrainState` is laid out in a checkpoint.

  `model` holds the weights evaluation uses (the EMA when one is kept, so
  that `load_model` and scripts.evaluate / predict / export load what
  training evaluated) merged with the BatchNorm statistics, keys as
  strings (the format of `save_model`). `train` holds the rest: step,
  optimizer state, and the raw parameters when an EMA is kept.
  """
  weights = stringify_keys(deep_merge(state.eval_params, state.batch_stats))
  train = {'step': state.step, 'opt_state': state.opt_state}
  if state.ema is not None:
    train['params'] = state.params
  return weights, train


def state_from_items(like: Any, weights: Mapping, train: Mapping) -> Any:
  """The inverse of `state_items`, with `like`'s structure and key types."""
  merged = restore_keys(weights, deep_merge(like.eval_params, like.batch_stats))
  eval_params = split_like(merged, like.eval_params)
  if like.ema is not None:
    rest = {'ema': eval_params, 'params': train['params']}
  else:
    rest = {'params': eval_params}
  return like.replace(
    step=train['step'],
    opt_state=train['opt_state'],
    batch_stats=split_like(merged, like.batch_stats),
    **rest,
  )
