"""A run measures itself: a `jax.profiler` trace of chosen train steps
(`train.profile_steps`) in the workdir, and each traced step's wall and
device time logged beside the planner's estimate for the same program
(`train.profile_plan`, rows of `scripts.plan --output`).

Also what reads a trace: the device kernels of a Chrome / Perfetto trace
of JAX or PyTorch (the benchmark classifies them by kind).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from deeplab_jax.errors import ConfigError

PROFILE_DIR = 'profile'  # under the workdir; TensorBoard's profile plugin
STEP_EVENT = 'train'  # the name of each traced step's annotation


def parse_steps(spec: str) -> list[int]:
  """`train.profile_steps` as a sorted list of step numbers (1 is the first
  step, as metrics.jsonl counts them): `''` none, `'5'`, `'5-7'`, `'5,9'`.
  The steps must be consecutive: one trace holds them."""
  spec = spec.replace(' ', '')
  if not spec:
    return []
  match = re.fullmatch(r'(\d+)(?:-(\d+))?', spec) or re.fullmatch(
    r'\d+(?:,\d+)*', spec
  )
  if match is None:
    raise ConfigError(
      f"train.profile_steps={spec!r}: give steps as '5', '5-7' or '5,6,7'"
    )
  if ',' in spec:
    steps = sorted({int(s) for s in spec.split(',')})
  else:
    first = int(match.group(1))
    steps = list(range(first, int(match.group(2) or first) + 1))
  if not steps or steps[0] < 1 or steps != list(range(steps[0], steps[-1] + 1)):
    raise ConfigError(
      f'train.profile_steps={spec!r}: the steps must be consecutive and '
      'start at 1 or later (one trace holds them)'
    )
  return steps


class StepProfiler:
  """Traces the chosen steps of a run into `WORKDIR/profile/` on process 0
  (the other steps run as they would without it) and, once the last one
  ran, gives their times as a metrics record."""

  def __init__(
    self,
    workdir: str,
    steps: str,
    *,
    plan_row: dict[str, Any] | None = None,
    enabled: bool = True,
  ):
    self.steps = parse_steps(steps) if enabled else []
    self.directory = os.path.join(workdir, PROFILE_DIR)
    self._plan_row = plan_row
    self._wall_s: list[float] = []
    self.record: dict[str, float] | None = None

  def run(self, step: int, train_fn: Callable, *args) -> Any:
    """`train_fn(*args)` as step `step`: traced, timed and waited for when
    it is one of the chosen steps."""
    if step not in self.steps:
      return train_fn(*args)
    if step == self.steps[0]:
      jax.block_until_ready(args)  # the step before is not traced
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
    start = time.perf_counter()
    with jax.profiler.StepTraceAnnotation(STEP_EVENT, step_num=step):
      out = jax.block_until_ready(train_fn(*args))
    self._wall_s.append(time.perf_counter() - start)
    if step == self.steps[-1]:
      jax.profiler.stop_trace()
      self.record = self._record()
    return out

  def _record(self) -> dict[str, float]:
    n = len(self.steps)
    kernels = device_kernels(read_trace(self.directory))
    record = {
      'profiled_steps': float(n),
      'profile_wall_ms': 1e3 * sum(self._wall_s) / n,
      'profile_device_ms': sum(us for _, us in kernels) / 1e3 / n,
    }
    if self._plan_row:
      record['planned_xla_step_ms'] = float(self._plan_row['step_ms'])
      if 'hbm_step_ms' in self._plan_row:
        record['planned_hbm_step_ms'] = float(self._plan_row['hbm_step_ms'])
    return record


def summary(profiler: StepProfiler) -> str:
  """The one line a run prints once its profiled steps ran."""
  r, steps = profiler.record, profiler.steps
  span = f'{steps[0]}-{steps[-1]}' if len(steps) > 1 else str(steps[0])
  line = (
    f'profiled step {span}: {r["profile_wall_ms"]:.1f} ms wall, '
    f'{r["profile_device_ms"]:.1f} ms device time per step'
  )
  if 'planned_xla_step_ms' in r:
    line += f'; planned: {r["planned_xla_step_ms"]:.1f} ms (XLA roofline)'
    if 'planned_hbm_step_ms' in r:
      line += f', {r["planned_hbm_step_ms"]:.1f} ms (HBM roofline)'
  return f'{line}; trace in {profiler.directory} (docs/tpu.md)'


def plan_row(path: str, config, num_devices: int) -> dict[str, Any] | None:
  """The row of `path` (`scripts.plan --output` JSON lines) planned for this
  run's program: its arch, global batch, dtype, crop, remat and number of
  chips; None when there is none (a refused plan has no estimate)."""
  if not path:
    return None
  want = {
    'arch': config.model.arch,
    'batch': config.train.batch_size,
    'dtype': config.model.dtype,
    'crop': list(config.data.crop_size),
    'remat': config.model.remat,
    'chips': num_devices,
  }
  try:
    with open(os.path.expanduser(path)) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError) as e:
    logging.warning(
      'train.profile_plan=%s: not scripts.plan --output JSON lines (%s); '
      'the profiled steps are logged without an estimate',
      path,
      e,
    )
    return None
  for row in reversed(rows):  # the newest plan of the program
    if 'step_ms' in row and all(row.get(k) == v for k, v in want.items()):
      return row
  return None


# ------------------------------------------------------- reading a trace ---


def read_trace(profile_dir: str) -> list[dict]:
  """The events of the newest trace under `profile_dir` (JAX's
  `perfetto_trace.json.gz` or PyTorch's `torch_trace.json.gz`); [] if
  there is none."""
  pattern = os.path.join(profile_dir, '**', '*_trace.json.gz')
  paths = [
    p
    for p in glob.glob(pattern, recursive=True)
    if os.path.basename(p) in ('perfetto_trace.json.gz', 'torch_trace.json.gz')
  ]
  if not paths:
    return []
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def device_kernels(events: list[dict]) -> list[tuple[str, float]]:
  """`(name, microseconds)` of the device kernels in a Chrome/Perfetto trace:
  PyTorch's `kernel`/`gpu_mem*` events, or JAX's events on a device process
  (`/device:GPU:0`, `/device:TPU:0`); other host events, and libtpu's
  `/device:CUSTOM` tracks, are left out. On XLA:CPU, whose
  ops run on host threads, the ops' own events (`hlo_op` in their args)
  stand for kernels: their times add up the threads' busy time."""
  device_pids = {
    e['pid']
    for e in events
    if e.get('ph') == 'M'
    and e.get('name') == 'process_name'
    and re.search(r'/device:(GPU|TPU)', str(e.get('args', {}).get('name', '')))
  }
  kernels = []
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e:
      continue
    cat = str(e.get('cat', ''))
    if cat in ('kernel', 'gpu_memcpy', 'gpu_memset') or (
      not cat and e.get('pid') in device_pids
    ):
      kernels.append((str(e.get('name', '')), float(e['dur'])))
  if not kernels and not device_pids:  # XLA:CPU
    for e in events:
      if e.get('ph') == 'X' and 'hlo_op' in (e.get('args') or {}):
        kernels.append((str(e.get('name', '')), float(e['dur'])))
  if not kernels:  # PyTorch on CPU: its operators' self times
    kernels = _self_times([e for e in events if e.get('cat') == 'cpu_op'])
  return kernels


def _self_times(ops: list[dict]) -> list[tuple[str, float]]:
  """`(name, microseconds)` of each operator less the operators nested in
  it on the same thread, so `aten::conv2d` -> `aten::mkldnn_convolution`
  counts once, and a backward node's time goes to the kernels it ran."""
  out = []
  by_thread: dict[Any, list[dict]] = {}
  for e in ops:
    if e.get('ph') == 'X' and 'dur' in e:
      by_thread.setdefault(e.get('tid'), []).append(e)
  for events in by_thread.values():
    events.sort(key=lambda e: (float(e['ts']), -float(e['dur'])))
    stack: list[list] = []  # [end, name, self time]
    for e in events:
      start, dur = float(e['ts']), float(e['dur'])
      while stack and stack[-1][0] <= start:
        _, name, self_us = stack.pop()
        out.append((name, self_us))
      if stack:
        stack[-1][2] -= dur
      stack.append([start + dur, str(e.get('name', '')), dur])
    out.extend((name, self_us) for _, name, self_us in stack)
  return out
