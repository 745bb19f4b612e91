"""Device kernel time per step by kind, from Chrome / Perfetto traces of
JAX (`jax.profiler`) and PyTorch (`torch.profiler`)."""

from __future__ import annotations

from typing import Any

from deeplab_jax.profiling import device_kernels, read_trace

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


def kernel_time_summary(profile_dir: str, steps: int) -> dict[str, Any]:
  """Device kernel milliseconds per step by kind, and the top kernels.

  Reads the newest trace under `profile_dir` (JAX's
  `perfetto_trace.json.gz` or PyTorch's `torch_trace.json.gz`). On CPU
  the "kernels" are XLA's ops (their threads' busy time) and PyTorch's
  operators (self time on the calling thread, each running on all cores).
  Returns `{}` where the trace holds none.
  """

  events = read_trace(profile_dir)
  kernels = device_kernels(events)
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
