"""The one place that talks to Orbax.

A checkpoint directory holds numbered steps (`DIR/<step>/`), each with the
items `model` (parameters and BatchNorm statistics as a nested dict) and
`meta` (JSON). The metadata makes a checkpoint self-describing: the arch,
number of classes and full model config, class names and input
normalisation, so `--checkpoint DIR` is enough to rebuild and run the model.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from deeplab_jax import multihost
from deeplab_jax.data import normalization
from deeplab_jax.errors import (
  CheckpointCorruptError,
  CheckpointMismatchError,
  CheckpointNotFoundError,
  CheckpointReadError,
  CheckpointWriteError,
  ConfigError,
  UserError,
)
from deeplab_jax.models import registry

FORMAT = 'deeplab_jax.model'
FORMAT_VERSION = 1
TRASH = 'trash'  # Orbax's todelete_subdir: deletion is one atomic rename
CORRUPT = 'corrupt'  # steps that failed verification, kept for inspection
# A step that fails to restore for a reason other than its content (a
# storage or memory error) is tried this often, with the delay doubling
# from RESTORE_BACKOFF_S, before the run stops; content errors are tried
# twice before the step counts as corrupt.
RESTORE_TRIES = 4
RESTORE_BACKOFF_S = 1.0
# What TensorStore says of bytes that are there but wrong or cut short.
_DATA_ERRORS = re.compile(
  r'OUT_OF_RANGE|FAILED_PRECONDITION|NOT_FOUND|DATA_LOSS|Data corruption|'
  r'Truncated|pytree structure'
)


def resolve_path(path: str | os.PathLike) -> str:
  """A local path made absolute (`~` expanded); a remote one (`gs://...`,
  any `scheme://`) returned untouched for Orbax and `etils.epath`."""
  path = os.fspath(path)
  if '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


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


def _committed_steps(directory: str) -> list[int]:
  """The step directories in `directory` (Orbax renames a step to its number
  when it commits), without asking Orbax."""
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  return [int(p.name) for p in path.iterdir() if p.name.isdigit()]


def has_steps(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds committed steps (a run writing there will
  resume), read from the file system alone: no Orbax, no collective."""
  return bool(_committed_steps(resolve_path(directory)))


def _checkpoint_dir(directory: str | os.PathLike) -> str:
  """`directory`, or its `checkpoints/` when given a training workdir (the
  directory users hold in mind), as an absolute path."""
  directory = resolve_path(directory)
  inner = os.path.join(directory, 'checkpoints')
  if not _committed_steps(directory) and epath.Path(inner).is_dir():
    return inner
  return directory


def _manager(directory: str) -> tuple[ocp.CheckpointManager, int]:
  if not epath.Path(directory).is_dir():
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


def training_config(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The resolved config (`config.json`) of the training run that wrote
  `directory` (a workdir or its `checkpoints/`), or None (also for a
  published weights name)."""
  from deeplab_jax.convert import sources

  if sources.is_name(str(directory)):
    return None
  directory = resolve_path(directory)
  for workdir in (directory, os.path.dirname(directory.rstrip('/'))):
    path = epath.Path(workdir, 'config.json')
    if path.exists() and epath.Path(workdir, 'checkpoints').is_dir():
      return json.loads(path.read_text())
  return None


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The `meta` item of the latest step in `directory` (a checkpoint
  directory, or a training workdir holding `checkpoints/`)."""
  directory = _checkpoint_dir(directory)
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
  directory = _checkpoint_dir(directory)
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
  mngr, step = _manager(directory)
  step_dir = os.path.join(directory, str(step))
  try:
    has_digests = _has_digests(step_dir, allow_unverified)
  except CheckpointCorruptError:
    mngr.close()
    raise
  items = {'model': ocp.args.StandardRestore(target)}
  if has_digests:
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
  if has_digests:
    try:
      _verify(dict(out, meta=meta))
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


def _has_digests(step_dir: str, allow_unverified: bool) -> bool:
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


def _verify(restored: Mapping) -> None:
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
  """`(model, train)`: how a `train.TrainState` is laid out in a checkpoint.

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


# ------------------------------------------------------------- integrity ---


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


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else ''
  return f'{type(e).__name__}: {line[:240]}'


def _is_corruption(e: BaseException) -> bool:
  """Whether a failed restore blames the step's content: its digests, a
  missing item or file, or bytes and metadata that do not decode (not a
  storage, network or memory error)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(
      e,
      (
        CheckpointCorruptError,
        KeyError,
        FileNotFoundError,
        json.JSONDecodeError,
      ),
    ):
      return True
    if isinstance(e, ValueError) and _DATA_ERRORS.search(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def _root_cause(e: BaseException) -> str:
  """The innermost reason of a (chained) write error, on one line: storage
  layers put the OS error last ('...: File too large [os_error_code=27]')."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = ' '.join(str(e).split())
  text = text if len(text) <= 200 else '...' + text[-200:]
  # Some layers give only the OS error's number: name it.
  code = re.search(r"os_error_code='?(\d+)", text)
  if code and os.strerror(int(code[1])) not in text:
    text += f' ({os.strerror(int(code[1]))})'
  return text


class TrainCheckpointer:
  """Training checkpoints: Orbax `CheckpointManager` with explicit policies
  and verified restores.

  Each step holds `model` (parameters + BatchNorm statistics, the format of
  `save_model`, so `load_model` works on training checkpoints too), `train`
  (optimizer state, step, EMA), `data` (JSON: the global position of the
  input, which depends only on the step, seed and global batch), `meta`
  (JSON) and `digests` (JSON: a content digest of every saved array and of
  the data item, written in the same atomic commit).

  Saves are asynchronous with atomic commits; it keeps the latest `keep`
  steps plus the best by `best_metric` (never only the best: a resume must
  not go back to an old best step). Deletions go through a `trash/` rename
  so a crash during garbage collection leaves no half-deleted step listed;
  `trash/` and unfinished temporary steps are removed when a run opens the
  directory. `restore` verifies every array against its digest and
  falls back to the newest step that restores and verifies.
  """

  def __init__(
    self,
    directory: str,
    *,
    every_steps: int,
    keep: int = 2,
    best_metric: str = 'miou',
    allow_unverified: bool = False,
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
      todelete_subdir=TRASH,
      enable_async_checkpointing=True,
    )
    self.directory = resolve_path(directory)
    self._allow_unverified = allow_unverified
    # The `meta` item of the step `restore` returned, None before one.
    self.restored_metadata: dict[str, Any] | None = None
    self._empty_trash()
    self._failed = False
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def _empty_trash(self) -> None:
    """Steps that garbage collection renamed into `trash/` are gone from the
    listing already; deleting them for real may be interrupted harmlessly."""
    if jax.process_index() == 0:
      trash = epath.Path(self.directory, TRASH)
      if trash.exists():
        trash.rmtree()

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(step)

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    data_state: Mapping[str, Any],
    metadata: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None = None,
    force: bool = False,
  ) -> bool:
    """Starts an async save of `state` (a `train.TrainState`) as `step`,
    with `data_state` (`data_position`), `metadata` and the digests of
    everything."""
    weights, train_state = state_items(state)
    digests = {
      'model': array_digests(weights),
      'train': array_digests(train_state),
      'data': json_digest(data_state),
      'meta': json_digest(metadata),
    }
    try:
      return self._mngr.save(
        step,
        args=ocp.args.Composite(
          model=ocp.args.StandardSave(weights),
          train=ocp.args.StandardSave(train_state),
          data=ocp.args.JsonSave(dict(data_state)),
          meta=ocp.args.JsonSave(dict(metadata)),
          digests=ocp.args.JsonSave(digests),
        ),
        metrics=dict(metrics) if metrics else None,
        force=force,
      )
    except Exception as e:  # an earlier async write failed (Orbax re-raises
      # TensorStore's ValueError / OSError from its background thread)
      raise self._write_error(e) from e

  def restore(self, like: Any, data_state: Mapping[str, Any]) -> Any:
    """The latest good step as a train state shaped and placed like `like`
    (a state, or its `jax.ShapeDtypeStruct`s with shardings: a run can
    resume on another device count), or None when there are no steps.

    `data_state` is this run's `data_position`; a step whose input order
    (seed, global batch) differs is refused, since resuming would not
    replay the same data.
    """
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      like,
    )
    weights_like, train_like = state_items(abstract)
    restored = self._restore_latest(weights_like, train_like)
    if restored is None:
      return None
    step, weights, train_state, recorded = restored
    order = ('seed', 'global_batch_size')
    if any(recorded.get(k) != data_state[k] for k in order):
      raise ConfigError(
        f'checkpoint {step} was trained with seed {recorded.get("seed")} '
        f'and batch {recorded.get("global_batch_size")}; resuming with '
        f'seed {data_state["seed"]} and batch '
        f'{data_state["global_batch_size"]} would not replay the same data'
      )
    logging.info('resumed from step %d in %s', step, self.directory)
    return state_from_items(like, weights, train_state)

  def _write_error(self, e: BaseException) -> UserError:
    self._failed = True
    if multihost.is_peer_failure(e):
      # A peer died during the write's collective: not a disk problem.
      return multihost.PeerLostError(_root_cause(e))
    last = self._last_committed()
    then = (
      f'resume from step {last}'
      if last is not None
      else 'start again (no step was committed)'
    )
    return CheckpointWriteError(
      f'could not write a checkpoint to {self.directory} ({_root_cause(e)}); '
      f'free disk space or fix permissions, then run the same command to '
      f'{then}'
    )

  def _last_committed(self) -> int | None:
    return max(_committed_steps(self.directory), default=None)

  def _restore_verified(
    self, step: int, abstract_weights: Mapping, abstract_train: Any
  ) -> tuple[dict, Any, dict]:
    step_dir = os.path.join(self.directory, str(step))
    has_digests = _has_digests(step_dir, self._allow_unverified)
    items = dict(
      model=ocp.args.StandardRestore(abstract_weights),
      train=ocp.args.StandardRestore(abstract_train),
      data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore(),
    )
    if has_digests:
      items['digests'] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if has_digests:
      _verify(out)
    self.restored_metadata = dict(out['meta'])
    self._restored_step = step
    return out['model'], out['train'], dict(out['data'])

  def restored_saved_at(self) -> str:
    """When the step `restore` returned was committed (UTC), as
    `saved at 2026-12-07 04:30:12 UTC`, or `saved at an unknown time`."""
    try:
      stat = epath.Path(self.directory, str(self._restored_step)).stat()
      when = datetime.datetime.fromtimestamp(stat.mtime, datetime.UTC)
    except (AttributeError, OSError, ValueError):
      return 'saved at an unknown time'
    return f'saved at {when:%Y-%m-%d %H:%M:%S} UTC'

  def _restore_latest(
    self, abstract_weights: Mapping, abstract_train: Any
  ) -> tuple[int, dict, Any, dict] | None:
    """The newest step that restores and verifies, onto the given abstract
    targets (their shardings decide the placement: a run can resume on
    another device count).

    A step is corrupt when its content fails its digests, an item is
    missing, or its bytes or metadata cannot be decoded, twice
    (`_restore_agreed`). Corrupt steps are reported (step, reason) and,
    once an older step restored and verified, moved to `corrupt/` (kept
    for inspection, and out of the way of the steps the resumed run will
    save again). Any other error is retried and, if it persists, stops the
    run with every step in place. Every process takes the same decisions.
    Returns `(step, weights, train_state, data_state)`, or None when the
    directory has no steps. Raises `CheckpointCorruptError` when steps
    exist but none is usable, leaving everything in place.
    """
    bad = []
    for step in sorted(self.all_steps(), reverse=True):
      restored, reason = self._restore_agreed(
        step, abstract_weights, abstract_train
      )
      if restored is None:
        logging.warning('checkpoint step %d is unusable: %s', step, reason)
        bad.append((step, reason))
        continue
      if bad:
        self._quarantine([b for b, _ in bad])
        logging.warning(
          'checkpoint step(s) %s in %s failed verification (%s); moved to '
          '%s/, resuming from step %d',
          ', '.join(str(b) for b, _ in bad),
          self.directory,
          bad[0][1],
          CORRUPT,
          step,
        )
      return (step, *restored)
    if bad:
      raise CheckpointCorruptError(
        f'no usable checkpoint in {self.directory}: '
        + '; '.join(f'step {b}: {r}' for b, r in bad)
        + '. Nothing was changed; restore the steps from a backup or train '
        'in a new --workdir'
      )
    return None

  def _restore_agreed(self, step, abstract_weights, abstract_train):
    """`(restored, '')` or `(None, reason)` when `step` is corrupt.

    Every process tries the step once per round and the rounds' outcomes
    are exchanged (`multihost.gather`), so all retry, skip or stop
    together. A content error on any process (`_is_corruption`) gets one
    more round; any other error up to `RESTORE_TRIES` rounds with backoff,
    then `CheckpointReadError`.
    """
    delay, content_rounds, rounds = RESTORE_BACKOFF_S, 0, 0
    while True:
      rounds += 1
      restored, outcome = None, 'ok'
      try:
        restored = self._restore_verified(
          step, abstract_weights, abstract_train
        )
      except Exception as e:  # Orbax's errors share no base class
        kind = 'corrupt' if _is_corruption(e) else 'error'
        outcome = f'{kind}|{_first_line(e)}'
      outcomes = multihost.gather(f'restore {step}', outcome)
      if all(o == 'ok' for o in outcomes):
        return restored, ''
      errors = [o for o in outcomes if o.startswith('error|')]
      if errors:
        reason = errors[0].partition('|')[2]
        if rounds >= RESTORE_TRIES:
          raise CheckpointReadError(
            f'could not read checkpoint step {step} in {self.directory} '
            f'({reason}) in {RESTORE_TRIES} tries; every step was left in '
            'place. Fix the storage or free memory, then run the same '
            'command again'
          )
        logging.warning(
          'reading checkpoint step %d failed (%s); trying again in %.0f s '
          '(%d of %d)',
          step,
          reason,
          delay,
          rounds + 1,
          RESTORE_TRIES,
        )
        time.sleep(delay)
        delay *= 2
        continue
      content_rounds += 1
      reason = next(o for o in outcomes if o != 'ok').partition('|')[2]
      if content_rounds >= 2:
        return None, reason
      logging.warning(
        'checkpoint step %d failed verification (%s); reading it once more',
        step,
        reason,
      )

  def _quarantine(self, steps: Sequence[int]) -> None:
    if jax.process_index() == 0:
      corrupt = epath.Path(self.directory, CORRUPT)
      corrupt.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dst = corrupt / str(step)
        n = 1
        while dst.exists():
          dst = corrupt / f'{step}.{n}'
          n += 1
        epath.Path(self.directory, str(step)).rename(dst)
    multihost.meet('quarantine')
    self._mngr.reload()

  def wait_until_finished(self) -> None:
    """Blocks until the async save is committed; a failed write raises
    `CheckpointWriteError` once (later calls, e.g. in cleanup, return)."""
    if self._failed:
      return
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      raise self._write_error(e) from e

  def close(self) -> None:
    if self._failed:
      return  # the manager's threads hold the failed write's error
    self._mngr.close()
    self._empty_trash()
