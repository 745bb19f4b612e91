"""Serialised inference artifacts: `jax.export` and TensorFlow SavedModel.

`export_dir` writes, for a fixed input height and width:
- `model.jax_export`: `jax.export`'s serialisation of the inference
  function, weights included as constants; the batch dimension is symbolic
  unless a batch size is given. Input: `[B, H, W, 3]` float32 normalised
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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deeplab_jax import predict
from deeplab_jax.errors import UserError

ARTIFACT = 'model.jax_export'
METADATA = 'export.json'


def _inference_fn(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
  view = predict.inference_view(model)
  graphdef, state = nnx.split(view)

  def fn(images):
    return nnx.merge(graphdef, state)(images)['out'].astype(jnp.float32)

  return fn


def export(
  model: nnx.Module, *, height: int, width: int, batch: int | None = None
) -> jax.export.Exported:
  """`jax.export` of the model's inference for `[batch, height, width, 3]`
  inputs (`batch=None`: any batch size)."""
  b = jax.export.symbolic_shape('b')[0] if batch is None else batch
  spec = jax.ShapeDtypeStruct((b, height, width, 3), jnp.float32)
  return jax.export.export(jax.jit(_inference_fn(model)))(spec)


def export_dir(
  model: nnx.Module,
  meta: Mapping[str, Any],
  directory: str,
  *,
  height: int,
  width: int,
  batch: int | None = None,
  saved_model: bool = False,
) -> list[str]:
  """Writes the artifacts described in the module docstring; returns their
  paths. Optional dependencies are checked before anything is written."""
  if saved_model:
    require_tensorflow()
  os.makedirs(directory, exist_ok=True)
  exported = export(model, height=height, width=width, batch=batch)
  paths = [os.path.join(directory, ARTIFACT), os.path.join(directory, METADATA)]
  with open(paths[0], 'wb') as f:
    f.write(exported.serialize())
  record = dict(meta, export={'height': height, 'width': width, 'batch': batch})
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
    _inference_fn(model),
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
