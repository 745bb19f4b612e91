"""A run's directory: the config it belongs to (`config.json`), its
metrics log (`metrics.jsonl` and TensorBoard events in `tb/`), and its
last evaluation. Checkpoints (`checkpoints/`) are `checkpointing`'s."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from etils import epath
from tensorboardX import SummaryWriter

from deeplab_jax.errors import ConfigError

# Config groups whose change makes a workdir's checkpoints incompatible.
RUN_IDENTITY = ('model', 'data.dataset', 'data.crop_size', 'train.batch_size')
# How the step is computed, not what it computes: a run resumes with these
# changed (and from workdirs written before they existed).
COMPUTE_ONLY = ('model.remat', 'model.scan_blocks')


def _flat_config(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_config(v, f'{prefix}.{k}' if prefix else k))
  return out


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run of another config, naming each
  differing key with both values. Writes nothing: `claim` does,
  once training starts, so a run that fails before its first step (no
  data, a bad `init_from`) leaves the workdir free for the fixed command."""
  path = epath.Path(workdir, 'config.json')
  if not path.exists():
    return
  ours = _flat_config(json.loads(config.to_json_best_effort()))
  theirs = _flat_config(json.loads(path.read_text()))
  identity = lambda key: (
    key not in COMPUTE_ONLY
    and any(
      key == group or key.startswith(group + '.') for group in RUN_IDENTITY
    )
  )
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


def claim(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config into the workdir (training has started)."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  epath.Path(workdir, 'config.json').write_text(
    json.dumps(json.loads(config.to_json_best_effort()), indent=2)
  )


def last_evaluation(workdir: str) -> dict[str, Any] | None:
  """The last evaluation record of `metrics.jsonl`, if any."""
  path = epath.Path(workdir, 'metrics.jsonl')
  if not path.exists():
    return None
  last = None
  for line in path.read_text().splitlines():
    record = json.loads(line) if line.strip() else {}
    if 'miou' in record:
      last = record
  return last


class MetricsLog:
  """metrics.jsonl (appended across resumes) + TensorBoard, process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._writer = None
    if enabled:
      self._jsonl = epath.Path(workdir, 'metrics.jsonl').open('a')
      self._writer = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': step}
    for k, v in values.items():
      if isinstance(v, dict):
        record[k] = v
        for name, x in v.items():
          if x == x:  # not NaN
            self._writer.add_scalar(f'{k}/{name}', x, step)
      else:
        record[k] = float(v)
        self._writer.add_scalar(k, float(v), step)
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._writer.close()

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *_) -> None:
    self.close()
