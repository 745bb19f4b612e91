"""What the entry scripts keep off stderr (`deeplab_jax.cli`)."""

import logging
import os
import threading
import types

from deeplab_jax import cli


def _report(hook, value):
  """Calls `hook` as the interpreter would for an unraisable `value`."""
  hook(
    types.SimpleNamespace(
      exc_type=type(value),
      exc_value=value,
      exc_traceback=None,
      err_msg=None,
      object=None,
    )
  )


def test_closed_loop_reports_dropped_only_from_other_threads():
  seen = []
  hook = cli._without_closed_loop_reports(lambda u: seen.append(u.exc_value))
  closed = RuntimeError('Event loop is closed')
  other = RuntimeError('something else')
  worker = threading.Thread(
    target=lambda: [_report(hook, closed), _report(hook, other)]
  )
  worker.start()
  worker.join()
  assert seen == [other]
  _report(hook, closed)  # the main thread's own loop: still reported
  assert seen == [other, closed]


def test_orbax_and_asyncio_records_hidden_ours_kept():
  def record(name, path):
    return logging.LogRecord(name, logging.ERROR, path, 1, 'msg', None, None)

  orbax = os.path.join('site-packages', 'orbax', 'checkpoint', 'future.py')
  ours = os.path.join('deeplab_jax', 'train.py')
  assert not cli._worth_showing(record('absl', orbax))
  assert not cli._worth_showing(record('asyncio', 'base_events.py'))
  assert cli._worth_showing(record('absl', ours))
  tfds = os.path.join('site-packages', 'tensorflow_datasets', 'file_utils.py')
  assert cli._worth_showing(record('absl', tfds))
  unprepared = record('absl', tfds)
  unprepared.msg = 'Variant folder /d/x/1.0.0 has no dataset_info.json'
  assert not cli._worth_showing(unprepared)
