"""Initial weights drawn and filled on the host.

Run eagerly, `jax.random.normal(key, shape)` or `jnp.zeros(shape)` compile
one XLA program per distinct shape; a model has dozens of shapes, so building
one used to spend most of a script's start compiling throw-away programs.
NumPy draws need no compilation: the key only seeds NumPy's generator, so
the same key still gives the same weights on every host and backend.

Under a trace (`nnx.eval_shape`, `jax.jit`) the key has no value; the draws
are then made with `jax.random`, whose values differ (only the shapes of
an `eval_shape` model are used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _generator(key: jax.Array) -> np.random.Generator:
  data = jax.random.key_data(key) if _is_typed_key(key) else key
  return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def _is_typed_key(key) -> bool:
  return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  """float32 draws from N(0, std^2)."""
  if isinstance(key, jax.core.Tracer):
    return std * jax.random.normal(key, shape, jnp.float32)
  draws = _generator(key).standard_normal(shape, np.float32)
  return jax.device_put(draws * np.float32(std))


def uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  """float32 draws from U(-bound, bound)."""
  if isinstance(key, jax.core.Tracer):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  draws = _generator(key).uniform(-bound, bound, shape).astype(np.float32)
  return jax.device_put(draws)


def full(shape: tuple[int, ...], value: float) -> jax.Array:
  """A float32 array of `value` (a transfer, not a compiled fill)."""
  return jax.device_put(np.full(shape, value, np.float32))
