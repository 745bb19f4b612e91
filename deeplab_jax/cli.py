"""Shared behaviour of the entry scripts: quiet library logs, one-line errors.

Entry points wrap their absl `main` with `entry_point`: `UserError`s exit 1
with `error: <message>` instead of a traceback (set `DEEPLAB_TRACEBACK=1` to
see it), and Orbax's log records are hidden unless `--verbosity` is given.

Why Orbax's records: its per-save INFO lines are chatter, and when an async
checkpoint write fails (a full disk) every one of its background threads
logs the same failure with a traceback, while the main thread raises it as
a `CheckpointWriteError` that is printed as the one line. For the same
reason asyncio's records are hidden (only Orbax runs event loops here), and
`RuntimeError('Event loop is closed')` raised in other threads is not
reported: TensorStore's callbacks raise it for the writes still in flight
after Orbax closed the failed write's event loop. TFDS's warning that a
data set's folder has no `dataset_info.json` is hidden too: it precedes the
one-line "not prepared" error, which names the fix.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

from absl import flags, logging

from deeplab_jax.errors import UserError


def entry_point(main: Callable[..., object]) -> Callable[..., object]:
  """Wraps an absl `main` (see module docstring)."""

  def wrapped(*args, **kwargs):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
      logging.get_absl_handler().addFilter(_worth_showing)
    if not hasattr(sys.unraisablehook, 'wrapped'):  # once per process
      sys.unraisablehook = _without_closed_loop_reports(sys.unraisablehook)
    try:
      return main(*args, **kwargs)
    except UserError as e:
      if os.environ.get('DEEPLAB_TRACEBACK'):
        raise
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  return wrapped


class ModelLoadFlags:
  """`--raw_weights` and `--allow_unverified` for the scripts that load a
  checkpoint (evaluate, predict, export); create once at module level."""

  def __init__(self):
    self._raw = flags.DEFINE_bool(
      'raw_weights',
      False,
      'For a run that kept a weight EMA: load the raw trained parameters '
      'instead of the EMA ones its evaluation used (the default).',
    )
    self._unverified = flags.DEFINE_bool(
      'allow_unverified',
      False,
      'Load a checkpoint step that has no digests (written before they '
      'existed) instead of refusing it.',
    )

  def load(self, directory: str):
    """`checkpointing.load_model(directory)` as the flags ask."""
    from deeplab_jax import checkpointing

    return checkpointing.load_model(
      directory,
      raw_weights=self._raw.value,
      allow_unverified=self._unverified.value,
    )


_ORBAX_DIR = os.sep + 'orbax' + os.sep


def _worth_showing(record) -> bool:
  if 'tensorflow_datasets' in record.pathname and (
    'has no dataset_info.json' in record.getMessage()
  ):
    return False  # an unprepared data set: the one-line error says the fix
  return _ORBAX_DIR not in record.pathname and record.name != 'asyncio'


def _without_closed_loop_reports(hook):
  """`hook`, except for 'Event loop is closed' raised outside the main thread
  (TensorStore reports those as unraisable; see module docstring)."""

  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if (
      threading.current_thread() is not threading.main_thread()
      and isinstance(value, RuntimeError)
      and str(value) == 'Event loop is closed'
    ):
      return
    hook(unraisable)

  unraisablehook.wrapped = hook
  return unraisablehook
