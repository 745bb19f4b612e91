"""Training checkpoints: asynchronous saves with atomic commits and explicit
keep policies, verified restores that every process agrees on, and one-line
errors for a full disk or a damaged step."""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from deeplab_jax import multihost
from deeplab_jax.checkpointing import array_writes
from deeplab_jax.checkpointing.digests import (
  array_digests,
  has_digests,
  json_digest,
  verify,
)
from deeplab_jax.checkpointing.layout import state_from_items, state_items
from deeplab_jax.checkpointing.paths import committed_steps, resolve_path
from deeplab_jax.errors import (
  CheckpointCorruptError,
  CheckpointReadError,
  CheckpointWriteError,
  ConfigError,
  UserError,
)

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
    array_writes.configure_for_this_job()
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
    """Starts an async save of `state` (a `steps.TrainState`) as `step`,
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
    return max(committed_steps(self.directory), default=None)

  def _restore_verified(
    self, step: int, abstract_weights: Mapping, abstract_train: Any
  ) -> tuple[dict, Any, dict]:
    step_dir = os.path.join(self.directory, str(step))
    verified = has_digests(step_dir, self._allow_unverified)
    items = dict(
      model=ocp.args.StandardRestore(abstract_weights),
      train=ocp.args.StandardRestore(abstract_train),
      data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore(),
    )
    if verified:
      items['digests'] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if verified:
      verify(out)
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
