"""Serialised inference artifacts: `jax.export` and TensorFlow SavedModel.

`export_dir` writes, for a fixed input height and width:
- `model.jax_export`: `jax.export`'s serialisation of the inference
  function, weights included as constants, for one or several platforms
  (`'cpu'`, `'cuda'`, `'rocm'`, `'tpu'`; default: this host's), each with
  its own kernels (`models.platform_view`; several platforms are one
  `jax.lax.platform_dependent`); the batch dimension is symbolic unless a
  batch size is given. Input: `[B, H, W, 3]` float32 normalised
  images; output: `[B, H, W, K]` float32 main-head logits (exactly
  `predict.logits`).
- `export.json`: the checkpoint metadata plus the input size, so the
  artifact is self-describing like a checkpoint.
- `saved_model/` (with `saved_model=True`, needs TensorFlow): the same
  function through `jax2tf`, with a `serving_default` signature.

`load_exported` reads the artifact back without the model code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deeplab_jax import predict
from deeplab_jax.errors import UserError

ARTIFACT = 'model.jax_export'
METADATA = 'export.json'


EXPORT_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def _inference_fn(
  model: nnx.Module, platforms: Sequence[str]
) -> Callable[[jax.Array], jax.Array]:
  """The main-head logits, with each platform's own kernels."""

  def logits_on(platform):
    graphdef, state = nnx.split(predict.inference_view(model, platform))
    return lambda images: nnx.merge(graphdef, state)(images)['out'].astype(
      jnp.float32
    )

  branches = {p: logits_on(p) for p in platforms}
  if len(branches) == 1:
    return branches[platforms[0]]
  return lambda images: jax.lax.platform_dependent(images, **branches)


def check_platforms(platforms: Sequence[str] | None) -> tuple[str, ...]:
  """`platforms` as a tuple (default: this host's), each one that
  `jax.export` knows, or a one-line error."""
  if not platforms:
    return (jax.export.default_export_platform(),)
  unknown = sorted(set(platforms) - set(EXPORT_PLATFORMS))
  if unknown:
    raise UserError(
      f'unknown export platform(s) {", ".join(unknown)}; choose from '
      f'{", ".join(EXPORT_PLATFORMS)}'
    )
  return tuple(dict.fromkeys(platforms))


def export(
  model: nnx.Module,
  *,
  height: int,
  width: int,
  batch: int | None = None,
  platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
  """`jax.export` of the model's inference for `[batch, height, width, 3]`
  inputs (`batch=None`: any batch size), for `platforms` (default: this
  host's), each with its own kernels."""
  platforms = check_platforms(platforms)
  b = jax.export.symbolic_shape('b')[0] if batch is None else batch
  spec = jax.ShapeDtypeStruct((b, height, width, 3), jnp.float32)
  fn = jax.jit(_inference_fn(model, platforms))
  return jax.export.export(fn, platforms=platforms)(spec)


def export_dir(
  model: nnx.Module,
  meta: Mapping[str, Any],
  directory: str,
  *,
  height: int,
  width: int,
  batch: int | None = None,
  saved_model: bool = False,
  platforms: Sequence[str] | None = None,
) -> list[str]:
  """Writes the artifacts described in the module docstring; returns their
  paths. Optional dependencies are checked before anything is written."""
  if saved_model:
    require_tensorflow()
  os.makedirs(directory, exist_ok=True)
  platforms = check_platforms(platforms)
  exported = export(
    model, height=height, width=width, batch=batch, platforms=platforms
  )
  paths = [os.path.join(directory, ARTIFACT), os.path.join(directory, METADATA)]
  with open(paths[0], 'wb') as f:
    f.write(exported.serialize())
  record = dict(
    meta,
    export={
      'height': height,
      'width': width,
      'batch': batch,
      'platforms': list(platforms),
    },
  )
  with open(paths[1], 'w') as f:
    json.dump(record, f, indent=1)
  if saved_model:
    paths.append(
      to_saved_model(
        model, os.path.join(directory, 'saved_model'), height, width
      )
    )
  return paths


def load_exported(
  directory: str,
) -> tuple[Callable[[np.ndarray], jax.Array], dict[str, Any]]:
  """`(logits_fn, metadata)` from an `export_dir` directory."""
  path = os.path.join(directory, ARTIFACT)
  if not os.path.isfile(path):
    raise UserError(
      f'{path} does not exist; write one with python -m scripts.export'
    )
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with open(os.path.join(directory, METADATA)) as f:
    meta = json.load(f)
  return exported.call, meta


def require_tensorflow():
  """`(tensorflow, jax2tf)`, or a one-line error saying how to get them."""
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError as e:
    raise UserError(
      f'a SavedModel needs TensorFlow ({e}); pip install tensorflow-cpu, or '
      'export without --saved_model'
    ) from e
  return tf, jax2tf


def to_saved_model(
  model: nnx.Module, directory: str, height: int, width: int
) -> str:
  """A TensorFlow SavedModel of the inference function via `jax2tf`
  (polymorphic batch); needs TensorFlow installed."""
  tf, jax2tf = require_tensorflow()
  fn = jax2tf.convert(
    _inference_fn(model, ('cpu',)),
    polymorphic_shapes=[f'(b, {height}, {width}, 3)'],
    with_gradient=False,
  )
  module = tf.Module()
  module.f = tf.function(
    fn,
    autograph=False,
    input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)],
  )
  tf.saved_model.save(
    module, directory, signatures={'serving_default': module.f}
  )
  return directory
