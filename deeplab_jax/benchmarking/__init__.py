"""Speed and memory measurements (used by scripts/benchmark.py, not tests).

`jax_step.jax_model` times the train and eval steps that `scripts.train`
runs (built by `programs.programs_of`); `torch_step.torch_model` does the
same work with the PyTorch reference (`reference`) on the same shapes;
`input` times the training input. `timing` holds the one timing rule,
`flops` the FLOP counts and peaks, `traces` the kernel-time summaries.
"""

from deeplab_jax.benchmarking.flops import matmul_flops, peak_tflops
from deeplab_jax.benchmarking.input import decode_and_augment, input_pipeline
from deeplab_jax.benchmarking.jax_step import benchmark_config, jax_model
from deeplab_jax.benchmarking.reference import (
  reference_overrides,
  torch_reference,
)
from deeplab_jax.benchmarking.torch_step import torch_model
from deeplab_jax.benchmarking.traces import kernel_time_summary

__all__ = [
  'benchmark_config',
  'decode_and_augment',
  'input_pipeline',
  'jax_model',
  'kernel_time_summary',
  'matmul_flops',
  'peak_tflops',
  'reference_overrides',
  'torch_model',
  'torch_reference',
]
