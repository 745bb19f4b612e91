"""Device kernel time per step by kind, from Chrome / Perfetto traces of
JAX (`jax.profiler`) and PyTorch (`torch.profiler`)."""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Any

# Train steps traced when profiling (after the timed ones).
PROFILE_STEPS = 3


# Device kernels by kind, from their names (cuDNN / CUTLASS / XLA / PyTorch
# kernels); the first kind whose words appear in a lower-cased name wins.
KERNEL_KINDS = (
  ('norm', ('bn_', 'batch_norm', 'batchnorm')),
  ('conv', ('conv', 'xmma', 'implicit', 'fprop', 'dgrad', 'wgrad', 'cudnn')),
  ('matmul', ('gemm', 'cublas', 'cutlass', 'matmul', 'nvjet', 'ynn', 'dot')),
  (
    'copy',
    (
      'transpose',
      'copy',
      'memcpy',
      'memset',
      'nchwtonhwc',
      'slice',
      'concatenate',
      'aten::cat',
      'pad',
    ),
  ),
)


def _kernel_kind(name: str) -> str:
  lower = name.lower()
  for kind, words in KERNEL_KINDS:
    if any(w in lower for w in words):
      return kind
  return 'other'  # XLA fusions: elementwise, reductions, BN, loss


def _device_kernels(events: list[dict]) -> list[tuple[str, float]]:
  """`(name, microseconds)` of the device kernels in a Chrome/Perfetto trace:
  PyTorch's `kernel`/`gpu_mem*` events, or JAX's events on a device process
  (`/device:GPU:0`, TPU); other host events are left out. On XLA:CPU, whose
  ops run on host threads, the ops' own events (`hlo_op` in their args)
  stand for kernels: their times add up the threads' busy time."""
  device_pids = {
    e['pid']
    for e in events
    if e.get('ph') == 'M'
    and e.get('name') == 'process_name'
    and '/device:' in str(e.get('args', {}).get('name', ''))
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


def kernel_time_summary(profile_dir: str, steps: int) -> dict[str, Any]:
  """Device kernel milliseconds per step by kind, and the top kernels.

  Reads the newest trace under `profile_dir` (JAX's
  `perfetto_trace.json.gz` or PyTorch's `torch_trace.json.gz`). On CPU
  the "kernels" are XLA's ops (their threads' busy time) and PyTorch's
  operators (self time on the calling thread, each running on all cores).
  Returns `{}` where the trace holds none.
  """

  pattern = os.path.join(profile_dir, '**', '*_trace.json.gz')
  paths = [
    p
    for p in glob.glob(pattern, recursive=True)
    if os.path.basename(p) in ('perfetto_trace.json.gz', 'torch_trace.json.gz')
  ]
  if not paths:
    return {}
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  kernels = _device_kernels(events)
  if not kernels:
    return {}
  by_kind: dict[str, float] = {}
  by_name: dict[str, list[float]] = {}
  for name, us in kernels:
    kind = _kernel_kind(name)
    by_kind[kind] = by_kind.get(kind, 0.0) + us
    by_name.setdefault(name, []).append(us)
  ms = {k: v / 1e3 / steps for k, v in sorted(by_kind.items())}
  ms['total'] = sum(ms.values())
  top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
  return {
    'kernel_ms_per_step': ms,
    'top_kernels': [
      [name[:120], _kernel_kind(name), sum(t) / 1e3 / steps, len(t) // steps]
      for name, t in top
    ],
  }
