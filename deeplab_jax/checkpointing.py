"""The one place that talks to Orbax.

A checkpoint directory holds numbered steps (`DIR/<step>/`), each with the
items `model` (parameters and BatchNorm statistics as a nested dict) and
`meta` (JSON). The metadata makes a checkpoint self-describing: the arch,
number of classes and full model config, class names and input
normalisation, so `--checkpoint DIR` is enough to rebuild and run the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from deeplab_jax.errors import CheckpointMismatchError, CheckpointNotFoundError
from deeplab_jax.models import registry

FORMAT = 'deeplab_jax.model'
FORMAT_VERSION = 1

# ImageNet statistics in 0-255 pixel units, as torchvision/mmseg normalise.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _weights(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
  graphdef, weights, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
  return graphdef, weights, rest


def _stringify(tree: Any) -> Any:
  """Orbax stores dict keys as strings; nnx.List indices are ints."""
  if isinstance(tree, Mapping):
    return {str(k): _stringify(v) for k, v in tree.items()}
  return tree


def _restore_keys(tree: Any, like: Any) -> Any:
  if isinstance(like, Mapping):
    return {k: _restore_keys(tree[str(k)], v) for k, v in like.items()}
  return tree


def model_metadata(
  model: nnx.Module,
  *,
  class_names: Sequence[str] | None = None,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
  extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The JSON metadata that makes a checkpoint self-describing."""
  desc = registry.describe(model)
  if class_names is not None and len(class_names) != desc['num_classes']:
    raise CheckpointMismatchError(
      f'{len(class_names)} class names for a model with '
      f'{desc["num_classes"]} classes'
    )
  return {
    'format': FORMAT,
    'version': FORMAT_VERSION,
    'model': desc,
    'class_names': list(class_names) if class_names else None,
    'normalization': {'mean': list(mean), 'std': list(std)},
    **dict(extra or {}),
  }


def save_model(
  directory: str | os.PathLike,
  model: nnx.Module,
  metadata: Mapping[str, Any],
  *,
  step: int = 0,
) -> str:
  """Writes `model`'s weights and `metadata` as step `step` of `directory`.

  Returns:
    The path of the step directory.
  """
  directory = os.path.abspath(os.fspath(directory))
  _, weights, _ = _weights(model)
  mngr = ocp.CheckpointManager(directory)
  mngr.save(
    step,
    args=ocp.args.Composite(
      model=ocp.args.StandardSave(_stringify(nnx.to_pure_dict(weights))),
      meta=ocp.args.JsonSave(dict(metadata)),
    ),
  )
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(directory, str(step))


def _manager(directory: str) -> tuple[ocp.CheckpointManager, int]:
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(
      f'checkpoint directory {directory} does not exist; pass a directory '
      'written by scripts.train or scripts.convert_torch'
    )
  mngr = ocp.CheckpointManager(directory)
  step = mngr.latest_step()
  if step is None:
    mngr.close()
    raise CheckpointNotFoundError(
      f'no checkpoint steps in {directory}; expected numbered step '
      'directories written by scripts.train or scripts.convert_torch'
    )
  return mngr, step


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The `meta` item of the latest step in `directory`."""
  directory = os.path.abspath(os.fspath(directory))
  mngr, step = _manager(directory)
  try:
    meta = mngr.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )['meta']
  except (KeyError, FileNotFoundError) as e:
    raise CheckpointMismatchError(
      f'{directory}/{step} has no model metadata (meta item); it was not '
      'written by deeplab-jax. Convert PyTorch weights with '
      'scripts.convert_torch.'
    ) from e
  finally:
    mngr.close()
  if not isinstance(meta, Mapping) or meta.get('format') != FORMAT:
    raise CheckpointMismatchError(
      f'{directory}/{step}: metadata is not a {FORMAT} record'
    )
  return dict(meta)


def load_model(
  directory: str | os.PathLike,
  *,
  sharding: jax.sharding.Sharding | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
  """Rebuilds the model saved in `directory` (latest step) with its weights.

  Args:
    directory: a checkpoint directory from `save_model` or training.
    sharding: where to place the weights; the first device by default.

  Returns:
    `(model, metadata)`; the model is in training mode like
    `models.create`.
  """
  directory = os.path.abspath(os.fspath(directory))
  meta = read_metadata(directory)
  abstract = nnx.eval_shape(
    lambda: registry.from_description(meta['model'], nnx.Rngs(0))
  )
  graphdef, weights, rest = _weights(abstract)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = nnx.to_pure_dict(weights)
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), like
  )
  mngr, step = _manager(directory)
  try:
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_stringify(target))
      ),
    )['model']
  except (ValueError, KeyError) as e:
    raise CheckpointMismatchError(
      f'{directory}/{step}: weights do not match the recorded model '
      f'{meta["model"]["arch"]}: {e}'
    ) from e
  finally:
    mngr.close()
  nnx.replace_by_pure_dict(weights, _restore_keys(restored, like))
  return nnx.merge(graphdef, weights, registry.materialize(rest)), meta
