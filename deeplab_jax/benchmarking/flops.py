"""FLOP counting (model FLOPs from the jaxpr, XLA's own count), peak
TFLOP/s by device, and compiled program sizes."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak TFLOP/s by device kind (vendor data sheets: NVIDIA H100/H200
# SXM, A100 SXM; Google Cloud TPU system architecture pages). float32 on
# NVIDIA is counted against TF32, which XLA and PyTorch use for float32
# convolutions by default.
PEAK_TFLOPS = {
  'H100': {'bfloat16': 989.4, 'float32': 494.7},
  'H200': {'bfloat16': 989.4, 'float32': 494.7},
  'A100': {'bfloat16': 312.0, 'float32': 156.0},
  'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
  'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
  'TPU v5p': {'bfloat16': 459.0, 'float32': 459.0},
  'TPU v6 lite': {'bfloat16': 918.0, 'float32': 918.0},
}


def peak_tflops(dtype: str) -> tuple[float, str]:
  """The first device's peak TFLOP/s for `dtype`, and where it came from.

  Accelerators: the data-sheet table above. CPU: a measured float32
  matrix product (2048 x 2048, the fastest of 10: a peak, not a typical
  time) on this process's devices.
  """
  device = jax.devices()[0]
  for kind, peaks in PEAK_TFLOPS.items():
    if kind in device.device_kind:
      return peaks[dtype], 'data sheet'
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(a))
  seconds = []
  for _ in range(10):
    t = time.perf_counter()
    jax.block_until_ready(matmul(a))
    seconds.append(time.perf_counter() - t)
  return 2 * n**3 / min(seconds) / 1e12, 'measured matmul'


def xla_flops(lowered) -> float:
  """XLA's cost-analysis FLOPs (0 where the backend gives none, as the
  CUDA backend of JAX 0.11 does for the lowered program)."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def _subjaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def matmul_flops(jaxpr) -> float:
  """FLOPs (2 x multiply-adds) of every convolution and matrix product in a
  jaxpr, nested calls included: the model FLOPs that MFU counts.

  Independent of the backend and of how XLA later lowers each op, so the
  same program counts the same on CPU and GPU.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'scan':  # its body runs `length` times
      total += eqn.params['length'] * matmul_flops(eqn.params['jaxpr'].jaxpr)
      continue
    if name == 'conv_general_dilated':
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
      window = np.prod([rhs[d] for d in spec[2:]])
      total += 2.0 * np.prod(out) * rhs[spec[1]] * window
    elif name == 'dot_general':
      out = eqn.outvars[0].aval.shape
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod([lhs[d] for d in contract])
    for sub in _subjaxprs(eqn.params):
      total += matmul_flops(sub)
  return total


def program_flops(fn, *args) -> float:
  return matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def program_mb(compiled) -> float:
  """Per-device bytes of a compiled program: live arguments, outputs not
  aliased to them, and scratch (XLA's static memory analysis)."""
  m = compiled.memory_analysis()
  if m is None:
    return float('nan')
  total = (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
  )
  return total / 2**20
