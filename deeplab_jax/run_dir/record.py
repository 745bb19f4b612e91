"""The run a workdir belongs to: `config.json` as the run started, the keys a
resume may change (each change appended to `resumed.jsonl`), and the checks
that refuse a workdir of another run or a path that cannot be one."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import ml_collections
from etils import epath

from deeplab_jax import step_options
from deeplab_jax.errors import ConfigError, UserError

# Config groups whose change makes a workdir's checkpoints incompatible.
RUN_IDENTITY = ('model', 'data.dataset', 'data.crop_size', 'train.batch_size')


# How the step is computed, not what it computes (`step_options`): a run
# resumes with these changed (and from workdirs written before they existed).
COMPUTE_ONLY = step_options.COMPUTE_ONLY


# Where and how long a run goes on, not what it trains: a resume may change
# these too. Each change is appended to `resumed.jsonl`; `config.json`
# keeps the values the run started with. Any other change is refused.
RESUMABLE = COMPUTE_ONLY + (
  'train.num_steps',
  'train.log_every_steps',
  'train.hang_timeout_s',
  'train.profile_steps',
  'train.profile_plan',
  'eval.every_steps',
  'eval.batch_size',
  'checkpoint',
  'data.data_dir',
  'data.num_workers',
  'mesh',
)


RESUMED = 'resumed.jsonl'


def _in(key: str, groups) -> bool:
  return any(key == g or key.startswith(g + '.') for g in groups)


def _flat_config(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_config(v, f'{prefix}.{k}' if prefix else k))
  return out


def is_remote(workdir: str) -> bool:
  """Whether `workdir` is on remote storage (`gs://...`, any `scheme://`)."""
  return '://' in workdir


def check_path(workdir: str) -> None:
  """Refuses a workdir that is a file, or lies under one (local paths)."""
  if is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(
      f'--workdir {workdir} is a file, not a folder; pass a folder (new or '
      'one a run of this config wrote)'
    )
  parent = os.path.dirname(path)
  while parent != os.path.dirname(parent) and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(
      f'--workdir {workdir} lies under {parent}, which is a file; pass a '
      'folder path'
    )


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run of another config, naming each
  differing key with both values. Writes nothing: `claim` does,
  once training starts, so a run that fails before its first step (no
  data, a bad `init_from`) leaves the workdir free for the fixed command."""
  ours, theirs = _configs(config, workdir)
  if theirs is None:
    return
  identity = lambda key: key not in COMPUTE_ONLY and _in(key, RUN_IDENTITY)
  diff = [
    f'{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now'
    for k in sorted(set(ours) | set(theirs))
    if identity(k) and ours.get(k) != theirs.get(k)
  ]
  if diff:
    raise ConfigError(
      f'{workdir} holds a run of another config ({"; ".join(diff)}); use '
      'a new --workdir or the same config'
    )
  # Keys a newer version added are not changes of an older workdir's run.
  changed = [
    f'{k}: {theirs[k]!r} there, {ours.get(k)!r} now'
    for k in sorted(theirs)
    if not _in(k, RESUMABLE) and ours.get(k) != theirs[k]
  ]
  if changed:
    raise ConfigError(
      f'{workdir} was trained with other settings ({"; ".join(changed)}); '
      'resume with the recorded values (config.json) or use a new --workdir'
    )


def _configs(config, workdir):
  """`(ours, the workdir's or None)`, flattened to dotted keys."""
  ours = _flat_config(json.loads(config.to_json_best_effort()))
  path = epath.Path(workdir, 'config.json')
  if not path.exists():
    return ours, None
  return ours, _flat_config(json.loads(path.read_text()))


def claim(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config into the workdir (training has started);
  a resume that changed `RESUMABLE` keys appends them, with both values,
  to `resumed.jsonl` and leaves `config.json` as the run started."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  ours, theirs = _configs(config, workdir)
  if theirs is None:
    epath.Path(workdir, 'config.json').write_text(
      json.dumps(json.loads(config.to_json_best_effort()), indent=2)
    )
    return
  changed = {
    k: [theirs.get(k), ours[k]]
    for k in sorted(ours)
    if k in theirs and ours[k] != theirs[k]
  }
  if changed:
    record = {
      'time': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'changed': changed,
    }
    with epath.Path(workdir, RESUMED).open('a') as f:
      f.write(json.dumps(record) + '\n')
