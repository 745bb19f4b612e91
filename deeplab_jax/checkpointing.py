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


def stringify_keys(tree: Any) -> Any:
  """Orbax stores dict keys as strings; nnx.List indices are ints."""
  if isinstance(tree, Mapping):
    return {str(k): stringify_keys(v) for k, v in tree.items()}
  return tree


def restore_keys(tree: Any, like: Any) -> Any:
  if isinstance(like, Mapping):
    return {k: restore_keys(tree[str(k)], v) for k, v in like.items()}
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
      model=ocp.args.StandardSave(stringify_keys(nnx.to_pure_dict(weights))),
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
        model=ocp.args.StandardRestore(stringify_keys(target))
      ),
    )['model']
  except (ValueError, KeyError) as e:
    raise CheckpointMismatchError(
      f'{directory}/{step}: weights do not match the recorded model '
      f'{meta["model"]["arch"]}: {e}'
    ) from e
  finally:
    mngr.close()
  nnx.replace_by_pure_dict(weights, restore_keys(restored, like))
  return nnx.merge(graphdef, weights, registry.materialize(rest)), meta


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


class TrainCheckpointer:
  """Training checkpoints: Orbax `CheckpointManager` with explicit policies.

  Each step holds `model` (parameters + BatchNorm statistics, the format of
  `save_model`, so `load_model` works on training checkpoints too), `train`
  (optimizer state, step, EMA), `data` (JSON: the global position of the
  input, which depends only on the step, seed and global batch) and `meta`
  (JSON). Saves are asynchronous with atomic commits; it keeps the
  latest `keep` steps plus the best by `best_metric` (never only the best:
  a resume must not go back to an old best step); deletions go through a
  `trash/` rename so a crash during garbage collection leaves no
  half-deleted step listed.
  """

  def __init__(
    self,
    directory: str,
    *,
    every_steps: int,
    keep: int = 2,
    best_metric: str = 'miou',
  ):
    cm = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
      save_decision_policy=cm.AnySavePolicy(
        [
          cm.FixedIntervalPolicy(every_steps),
          cm.PreemptionCheckpointingPolicy(),
        ]
      ),
      preservation_policy=cm.AnyPreservationPolicy(
        [
          cm.LatestN(n=keep),
          cm.BestN(
            get_metric_fn=lambda m: m[best_metric],
            reverse=False,  # keep the highest
            n=1,
            keep_checkpoints_without_metrics=False,
          ),
        ]
      ),
      cleanup_tmp_directories=True,
      todelete_subdir='trash',
      enable_async_checkpointing=True,
    )
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(step)

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(
    self,
    step: int,
    *,
    weights: Mapping,
    train_state: Any,
    data_state: Mapping[str, Any],
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    force: bool = False,
  ) -> bool:
    """Starts an async save of `step`."""
    return self._mngr.save(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardSave(weights),
        train=ocp.args.StandardSave(train_state),
        data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(dict(meta)),
      ),
      metrics=dict(metrics) if metrics else None,
      force=force,
    )

  def restore(
    self,
    step: int,
    *,
    abstract_weights: Mapping,
    abstract_train: Any,
  ) -> tuple[dict, Any, dict]:
    """Restores `step` onto the given abstract targets (their shardings
    decide the placement: a run can resume on another device count).
    Returns `(weights, train_state, data_state)`."""
    out = self._mngr.restore(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_weights),
        train=ocp.args.StandardRestore(abstract_train),
        data=ocp.args.JsonRestore(),
      ),
    )
    return out['model'], out['train'], dict(out['data'])

  def wait_until_finished(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()
