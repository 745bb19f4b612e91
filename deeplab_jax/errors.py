"""Errors caused by user input, reported by the scripts as one line.

Entry points (`deeplab_jax.cli.entry_point`) print a `UserError` as one
line instead of a traceback. Subclasses also derive from the builtin a
caller would expect (`ValueError`, `FileNotFoundError`).
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input: the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
  """An invalid architecture name, option or flag value."""


class CheckpointMismatchError(UserError, ValueError):
  """A state dict or checkpoint does not fit the requested model."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """No usable checkpoint where one was expected."""


class CheckpointCorruptError(UserError, RuntimeError):
  """No checkpoint step of a run can be restored and verified."""


class CheckpointWriteError(UserError, OSError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


class CheckpointReadError(UserError, OSError):
  """A checkpoint step could not be read, again and again, for a reason that
  is not its content (storage, memory): every step is left in place."""
