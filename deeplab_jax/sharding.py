"""Device mesh from the config; data, state shardings; host -> global."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from deeplab_jax.errors import ConfigError

DATA_AXIS = 'data'


def make_mesh(shape: Sequence[int] = (-1,)) -> jax.sharding.Mesh:
  """A 1-D `('data',)` mesh; `-1` takes every device."""
  shape = tuple(shape)
  if len(shape) != 1:
    raise ConfigError(f"mesh.shape must have one axis ('data'), got {shape}")
  n = jax.device_count() if shape[0] == -1 else shape[0]
  if n > jax.device_count():
    raise ConfigError(
      f'mesh.shape {shape} asks for {n} devices; {jax.device_count()} exist'
    )
  # Auto axes: XLA propagates shardings through the model (reshapes of
  # FSDP-split kernels included) as jit always did.
  return jax.make_mesh(
    (n,),
    (DATA_AXIS,),
    devices=jax.devices()[:n],
    axis_types=(jax.sharding.AxisType.Auto,),
  )


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over `'data'`."""
  return jax.sharding.NamedSharding(mesh, jax.P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.P())


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> None:
  """The global batch must split evenly over devices and hosts."""
  n = mesh.shape[DATA_AXIS]
  if global_batch % n or global_batch % jax.process_count():
    raise ConfigError(
      f'train.batch_size={global_batch} is not divisible by the {n} devices '
      f'of the data axis ({jax.process_count()} processes); use a multiple '
      f'of {n}'
    )


def to_global(
  batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
  """Per-host batches -> global arrays sharded on `'data'`."""
  sharding = data_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in batch.items()
  }


def state_shardings(
  state: Any, mesh: jax.sharding.Mesh, rule: str = 'replicated'
) -> Any:
  """Per-leaf shardings of the train state.

  `'replicated'`: every leaf on every device. `'fsdp'`: each array of at
  least 2**14 elements is split over the `'data'` axis along its largest
  dimension that the axis size divides (parameters, optimizer moments and
  EMA alike); XLA gathers them where the step needs them. Small arrays
  (BN vectors, biases, scalars) stay replicated.
  """
  if rule not in ('replicated', 'fsdp'):
    raise ConfigError(
      f"mesh.param_sharding must be 'replicated' or 'fsdp', not {rule!r}"
    )
  n = mesh.shape[DATA_AXIS]
  full = replicated(mesh)

  def one(leaf):
    shape = getattr(leaf, 'shape', ())
    if rule == 'replicated' or int(np.prod(shape)) < 2**14 or n == 1:
      return full
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
      if shape[d] % n == 0:
        spec = [None] * len(shape)
        spec[d] = DATA_AXIS
        return jax.sharding.NamedSharding(mesh, jax.P(*spec))
    return full

  return jax.tree.map(one, state)
