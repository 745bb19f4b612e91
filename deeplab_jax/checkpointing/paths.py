"""Where checkpoints are: paths made absolute, committed steps read from the
file system, a training workdir's `checkpoints/`, the latest step."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from etils import epath

from deeplab_jax.errors import CheckpointNotFoundError


def resolve_path(path: str | os.PathLike) -> str:
  """A local path made absolute (`~` expanded); a remote one (`gs://...`,
  any `scheme://`) returned untouched for Orbax and `etils.epath`."""
  path = os.fspath(path)
  if '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def committed_steps(directory: str) -> list[int]:
  """The step directories in `directory` (Orbax renames a step to its number
  when it commits), without asking Orbax."""
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  return [int(p.name) for p in path.iterdir() if p.name.isdigit()]


def has_steps(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds committed steps (a run writing there will
  resume), read from the file system alone: no Orbax, no collective."""
  return bool(committed_steps(resolve_path(directory)))


def checkpoint_dir(directory: str | os.PathLike) -> str:
  """`directory`, or its `checkpoints/` when given a training workdir (the
  directory users hold in mind), as an absolute path."""
  directory = resolve_path(directory)
  inner = os.path.join(directory, 'checkpoints')
  if not committed_steps(directory) and epath.Path(inner).is_dir():
    return inner
  return directory


def open_latest(directory: str) -> tuple[ocp.CheckpointManager, int]:
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
