"""Inference checkpoints: a model's weights with the metadata that makes them
self-describing (arch, number of classes and full model config, class names,
input normalisation), so `--checkpoint DIR` is enough to rebuild and run the
model. Training checkpoints hold the same `model` and `meta` items, so
`load_model` reads them too."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from deeplab_jax.checkpointing import array_writes
from deeplab_jax.checkpointing.digests import (
  array_digests,
  has_digests,
  json_digest,
  verify,
)
from deeplab_jax.checkpointing.layout import restore_keys, stringify_keys
from deeplab_jax.checkpointing.paths import (
  checkpoint_dir,
  open_latest,
  resolve_path,
)
from deeplab_jax.data import normalization
from deeplab_jax.errors import CheckpointCorruptError, CheckpointMismatchError
from deeplab_jax.models import registry

FORMAT = 'deeplab_jax.model'


FORMAT_VERSION = 1


def _weights(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
  graphdef, weights, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
  return graphdef, weights, rest


def model_metadata(
  model: nnx.Module,
  *,
  class_names: Sequence[str] | None = None,
  mean: Sequence[float] = normalization.IMAGENET[0],
  std: Sequence[float] = normalization.IMAGENET[1],
  extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The JSON metadata that makes a checkpoint of `model` self-describing:
  format, the model's `registry.describe` record, class names, input
  normalisation, and `extra` entries (training adds `dataset` and
  `weights`: `'ema'` or `'params'`)."""
  if class_names is not None and len(class_names) != model.num_classes:
    raise CheckpointMismatchError(
      f'{len(class_names)} class names for a model with '
      f'{model.num_classes} classes'
    )
  return {
    'format': FORMAT,
    'version': FORMAT_VERSION,
    'model': registry.describe(model),
    'class_names': list(class_names) if class_names else None,
    'normalization': normalization.as_record(mean, std),
    **dict(extra or {}),
  }


def save_model(
  directory: str | os.PathLike,
  model: nnx.Module,
  metadata: Mapping[str, Any],
  *,
  step: int = 0,
) -> str:
  """Writes `model`'s weights and `metadata` as step `step` of `directory`,
  with a digest of every array and of the metadata (`load_model` verifies
  them).

  Returns:
    The path of the step directory.
  """
  directory = resolve_path(directory)
  _, weights, _ = _weights(model)
  weights = stringify_keys(nnx.to_pure_dict(weights))
  array_writes.configure_for_this_job()
  mngr = ocp.CheckpointManager(directory)
  mngr.save(
    step,
    args=ocp.args.Composite(
      model=ocp.args.StandardSave(weights),
      meta=ocp.args.JsonSave(dict(metadata)),
      digests=ocp.args.JsonSave(
        {'model': array_digests(weights), 'meta': json_digest(metadata)}
      ),
    ),
  )
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(directory, str(step))


def training_config(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The resolved config (`config.json`) of the training run that wrote
  `directory` (a workdir or its `checkpoints/`), or None."""
  directory = resolve_path(directory)
  for workdir in (directory, os.path.dirname(directory.rstrip('/'))):
    path = epath.Path(workdir, 'config.json')
    if path.exists() and epath.Path(workdir, 'checkpoints').is_dir():
      return json.loads(path.read_text())
  return None


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The `meta` item of the latest step in `directory` (a checkpoint
  directory, or a training workdir holding `checkpoints/`)."""
  directory = checkpoint_dir(directory)
  mngr, step = open_latest(directory)
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
  raw_weights: bool = False,
  allow_unverified: bool = False,
) -> tuple[nnx.Module, dict[str, Any]]:
  """Rebuilds the model saved in `directory` (latest step) with its weights.

  Every array and the metadata are checked against the step's digests; a
  mismatch raises `CheckpointCorruptError` naming the step and the array.

  Args:
    directory: a checkpoint directory from `save_model` or training, or a
      training workdir (its `checkpoints/` is used).
    sharding: where to place the weights; the first device by default.
    raw_weights: for a run that kept a weight EMA, load the raw trained
      parameters instead of the EMA ones that its evaluation used (the
      default; `meta['weights']` says which a step's `model` item holds).
    allow_unverified: load a step that has no digests (written before
      they existed) with a warning instead of refusing it.

  Returns:
    `(model, metadata)`; the model is in training mode like
    `models.create`.
  """
  directory = checkpoint_dir(directory)
  meta = read_metadata(directory)
  abstract = nnx.eval_shape(
    lambda: registry.from_description(meta['model'], nnx.Rngs(0))
  )
  graphdef, weights, rest = _weights(abstract)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = nnx.to_pure_dict(weights)
  target = stringify_keys(
    jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      like,
    )
  )
  raw = raw_weights and meta.get('weights') == 'ema'
  mngr, step = open_latest(directory)
  step_dir = os.path.join(directory, str(step))
  try:
    verified = has_digests(step_dir, allow_unverified)
  except CheckpointCorruptError:
    mngr.close()
    raise
  items = {'model': ocp.args.StandardRestore(target)}
  if verified:
    items['digests'] = ocp.args.JsonRestore()
  if raw:
    # With the train item's own keys (list indices stay ints there), so
    # that its digests, keyed by those paths, apply.
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      params,
    )
    items['train'] = ocp.args.PyTreeRestore(
      {'params': params},
      restore_args=ocp.checkpoint_utils.construct_restore_args(
        {'params': params}
      ),
      partial_restore=True,
    )
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as e:
    raise CheckpointMismatchError(
      f'{directory}/{step}: weights do not match the recorded model '
      f'{meta["model"]["arch"]}: {e}'
    ) from e
  finally:
    mngr.close()
  if verified:
    try:
      verify(dict(out, meta=meta))
    except CheckpointCorruptError as e:
      raise CheckpointCorruptError(
        f'{step_dir}: {e}; the checkpoint is damaged: write it again or use '
        'another step'
      ) from e
  restored = out['model']
  if raw:  # the EMA parameters replaced by the raw ones, same statistics
    restored = _overlay(restored, stringify_keys(out['train']['params']))
  nnx.replace_by_pure_dict(weights, restore_keys(restored, like))
  return nnx.merge(graphdef, weights, registry.materialize(rest)), meta


def _overlay(base: Mapping, top: Mapping) -> dict:
  """`base` with the leaves that `top` also has taken from `top`."""
  return {
    k: (_overlay(v, top[k]) if isinstance(v, Mapping) else top[k])
    if k in top
    else v
    for k, v in base.items()
  }
