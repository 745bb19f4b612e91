"""Device mesh from the config; data, state shardings; host -> global."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from deeplab_jax.errors import ConfigError

DATA_AXIS = 'data'
# Splits each image's height: convolutions then exchange halo rows (XLA).
SPATIAL_AXIS = 'spatial'


def make_mesh(
  shape: Sequence[int] = (-1,), devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """`(D,)`: a `('data',)` mesh; `(D, S)`: `('data', 'spatial')`, each
  image's height split over `S` devices of one host. `-1` for `D` takes
  every (remaining) device of `devices` (default: all devices; TPU device
  descriptions of a topology plan a program ahead of time)."""
  shape = tuple(shape)
  devices = list(jax.devices() if devices is None else devices)
  if len(shape) not in (1, 2) or any(n == 0 or n < -1 for n in shape):
    raise ConfigError(
      f"mesh.shape must be (D,) or (D, S) ('data', 'spatial'), got {shape}"
    )
  spatial = shape[1] if len(shape) == 2 else 1
  if spatial == -1:
    raise ConfigError(f'mesh.shape {shape}: give S, the spatial axis size')
  per_host = sum(d.process_index == devices[0].process_index for d in devices)
  if spatial > per_host:
    raise ConfigError(
      f'mesh.shape {shape}: S={spatial} is more than the {per_host} devices '
      'of one host; the spatial axis splits an image within a host'
    )
  n = len(devices) // spatial if shape[0] == -1 else shape[0]
  if n < 1 or n * spatial > len(devices):
    raise ConfigError(
      f'mesh.shape {shape} asks for {n * spatial} devices; {len(devices)} '
      'exist (on a CPU, JAX_NUM_CPU_DEVICES=8 before the command simulates '
      '8; docs/distributed.md)'
    )
  names = (DATA_AXIS, SPATIAL_AXIS)[: len(shape)]
  # Auto axes: XLA propagates shardings through the model (reshapes of
  # FSDP-split kernels, halos of height-split activations) as jit always did.
  return jax.make_mesh(
    (n, spatial)[: len(shape)],
    names,
    devices=devices[: n * spatial],
    axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
  )


def spatial_size(mesh: jax.sharding.Mesh) -> int:
  """S: how many devices share each image (1 without a spatial axis)."""
  return mesh.shape.get(SPATIAL_AXIS, 1)


def batch_spec(mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
  """Batch over `'data'`, and height over `'spatial'` when there is one."""
  if SPATIAL_AXIS in mesh.shape:
    return jax.P(DATA_AXIS, SPATIAL_AXIS)
  return jax.P(DATA_AXIS)


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Batches `[B, H, ...]`: see `batch_spec`."""
  return jax.sharding.NamedSharding(mesh, batch_spec(mesh))


def split_images(x: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
  """Inside jit: `x` `[B, H, ...]` laid out as `data_sharding`, any height
  (XLA pads a height the spatial axis does not divide, invisibly); what
  evaluation and prediction of whole images of any size use."""
  return jax.lax.with_sharding_constraint(x, data_sharding(mesh))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.P())


def check_crop(
  crop_hw: Sequence[int], mesh: jax.sharding.Mesh, output_stride: int = 1
) -> None:
  """A height-split crop, and every feature map down to the model's
  `output_stride`, must split evenly over the spatial axis."""
  s = spatial_size(mesh)
  if s > 1 and crop_hw[0] % (s * output_stride):
    raise ConfigError(
      f'data.crop_size height {crop_hw[0]} gives feature maps of height '
      f'{crop_hw[0]}/{output_stride} (output stride {output_stride}) that '
      f'the {s} devices of the spatial axis (mesh.shape '
      f'{tuple(mesh.shape.values())}) do not split evenly; use a multiple '
      f'of {s * output_stride}'
    )


def check_batch_size(
  global_batch: int, mesh: jax.sharding.Mesh, key: str = 'train.batch_size'
) -> None:
  """The global batch (config `key`) must split evenly over devices and
  hosts."""
  n = mesh.shape[DATA_AXIS]
  if global_batch % n or global_batch % jax.process_count():
    raise ConfigError(
      f'{key}={global_batch} is not divisible by the {n} devices '
      f'of the data axis ({jax.process_count()} processes); use a multiple '
      f'of {n}'
    )


def to_global(
  batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
  """Per-host batches -> global arrays sharded as `data_sharding`."""
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
