"""A run's metrics: `metrics.jsonl` (appended across resumes) and
TensorBoard events in `tb/`, and the last evaluation read back."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from etils import epath


def summary_writer(logdir: str):
  """A tensorboardX `SummaryWriter` for `logdir`, imported without PyTorch.

  tensorboardX imports torch whenever it is installed, only to recognise
  torch tensors (the writers here log floats): a second or more of start-up
  and PyTorch's native libraries loaded into a JAX process. Hidden for the
  import (`import torch` raises ImportError, which tensorboardX handles),
  torch is neither loaded nor kept out for anyone importing it later."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter(logdir)


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
      self._writer = summary_writer(os.path.join(workdir, 'tb'))

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
