"""Content digests of a checkpoint's arrays and JSON items, written with a
step and verified in one function (`verify`) when it is read."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from deeplab_jax.errors import CheckpointCorruptError


def _leaf_digest(x: jax.Array) -> jax.Array:
  """Two uint32 position-weighted sums of an array's bits.

  Integer sums wrap modulo 2**32, so the result does not depend on the
  summation order, the sharding or the device count. Each element is
  multiplied by an odd (invertible) weight, so a change of any single
  element always changes the first sum; the second, differently weighted
  and bit-mixed, makes an accidental match of multi-element damage a
  ~2**-64 event.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize in (1, 2):
    udtype = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
    bits = jax.lax.bitcast_convert_type(x, udtype).astype(jnp.uint32)
  else:  # 8-byte types become [..., 2] uint32
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.stack(_weighted_sums(bits.reshape(-1), jnp))


def _weighted_sums(bits, xp) -> tuple[Any, Any]:
  """`_leaf_digest`'s two sums of flat uint32 `bits`, with `xp` NumPy or
  jax.numpy (uint32 arithmetic wraps alike in both)."""
  u32 = xp.uint32
  i = xp.arange(bits.size, dtype=u32)
  w1 = i * u32(2) + u32(1)
  w2 = (i * u32(0x9E3779B1) + u32(0x7F4A7C15)) | u32(1)
  mixed = bits ^ (bits >> u32(15)) ^ (bits << u32(7))
  return xp.sum(bits * w1, dtype=u32), xp.sum(mixed * w2, dtype=u32)


@jax.jit
def _tree_digests(tree: Any) -> Any:
  return jax.tree.map(_leaf_digest, tree)


def _host_leaf_digest(x: Any) -> tuple[int, int]:
  """`_leaf_digest` in NumPy, for an array in this process's memory: the
  same two numbers, without compiling a digest program per tree structure."""
  x = np.asarray(x)
  x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype)).reshape(-1)
  if x.dtype == np.bool_:
    bits = x.astype(np.uint32)
  elif x.dtype.itemsize in (1, 2):
    udtype = np.uint8 if x.dtype.itemsize == 1 else np.uint16
    bits = x.view(udtype).astype(np.uint32)
  else:  # 4 bytes, or 8 as two uint32 words in memory order
    bits = x.view(np.uint32)
  d1, d2 = _weighted_sums(bits, np)
  return int(d1), int(d2)


def _in_host_memory(x: Any) -> bool:
  """Whether this process holds `x` whole in its own memory (NumPy, or a
  JAX array on this process's CPU devices)."""
  if not isinstance(x, jax.Array):
    return True
  return x.is_fully_addressable and all(
    d.platform == 'cpu' for d in x.devices()
  )


def array_digests(tree: Any) -> dict[str, list]:
  """`{path: [d1, d2, shape, dtype]}` for every array leaf of `tree` (any
  sharding gives the same value): in NumPy where every leaf is in this
  process's memory, else on the accelerators or hosts holding them (one
  jitted pass, and no copy of the weights to the host before the save)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if all(_in_host_memory(leaf) for _, leaf in leaves):
    digests = [_host_leaf_digest(leaf) for _, leaf in leaves]
  else:
    digests = jax.tree.leaves(jax.device_get(_tree_digests(tree)))
  return {
    jax.tree_util.keystr(path): [
      int(d[0]),
      int(d[1]),
      list(leaf.shape),
      str(leaf.dtype),
    ]
    for (path, leaf), d in zip(leaves, digests, strict=True)
  }


def json_digest(record: Mapping[str, Any]) -> str:
  """sha256 of a JSON item's canonical serialisation."""
  text = json.dumps(record, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()


def has_digests(step_dir: str, allow_unverified: bool) -> bool:
  """Whether `step_dir` has its digests item; a step without one is refused
  unless `allow_unverified` (then used with a warning)."""
  if epath.Path(step_dir, 'digests').is_dir():
    return True
  if not allow_unverified:
    raise CheckpointCorruptError(
      f'{step_dir} has no digests item, so its arrays cannot be verified '
      '(it predates digests, or was damaged); write it again '
      '(scripts.convert_torch / scripts.train), or pass --allow_unverified '
      'to use it as it is'
    )
  logging.warning('%s has no digests; used unverified', step_dir)
  return False


def verify(restored: Mapping) -> None:
  """Checks what was restored against the step's digests (`restored
  ['digests']`): each JSON record present (`data`, `meta`) and every array
  restored from `model` and `train`. An array without a digest fails too."""
  want = restored['digests']
  for item in ('data', 'meta'):
    if (
      item in restored
      and item in want
      and (json_digest(dict(restored[item])) != want[item])
    ):
      raise CheckpointCorruptError(f'item {item} does not match its digest')
  for item in ('model', 'train'):
    if item not in restored:
      continue
    recorded = want.get(item, {})
    for key, digest in array_digests(restored[item]).items():
      if recorded.get(key) != digest:
        raise CheckpointCorruptError(
          f'item {item}, array {key} does not match its digest'
        )
