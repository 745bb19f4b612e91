"""Shared behaviour of the entry scripts: quiet library logs, one-line errors.

Entry points wrap their absl `main` with `entry_point`: `UserError`s exit 1
with `error: <message>` instead of a traceback (set `DEEPLAB_TRACEBACK=1` to
see it), and Orbax's per-save INFO chatter is hidden unless `--verbosity` is
given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import flags, logging

from deeplab_jax.errors import UserError


def entry_point(main: Callable[..., object]) -> Callable[..., object]:
  """Wraps an absl `main` (see module docstring)."""

  def wrapped(*args, **kwargs):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(*args, **kwargs)
    except UserError as e:
      if os.environ.get('DEEPLAB_TRACEBACK'):
        raise
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  return wrapped
