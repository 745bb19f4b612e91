"""Measures the programs `scripts.train` runs (`programs.programs_of`)."""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from deeplab_jax import defaults, initialization, sharding
from deeplab_jax.benchmarking.flops import (
  peak_tflops,
  program_flops,
  program_mb,
  xla_flops,
)
from deeplab_jax.benchmarking.reference import reference_overrides
from deeplab_jax.benchmarking.timing import median_seconds, peak_mem_mb
from deeplab_jax.benchmarking.traces import PROFILE_STEPS, kernel_time_summary
from deeplab_jax.programs import programs_of


def benchmark_config(
  arch: str,
  *,
  batch: int,
  size: tuple[int, int],
  dtype: str = 'float32',
  devices: int = 1,
  spatial: int = 1,
  param_sharding: str = 'replicated',
  scan_blocks: bool = False,
  remat_blocks: bool = False,
  aux: bool = False,
) -> ml_collections.ConfigDict:
  """The run a benchmark row measures: the base recipe's training (SGD
  with momentum, weight decay and the poly schedule, cross-entropy with
  255 ignored, uint8 pixels normalised in the step; with `aux`, the
  auxiliary head's loss at `loss.aux_weight`) for `arch` in its PyTorch
  reference's layout (`reference_overrides`), random weights."""
  c = defaults.get_base_config()
  c.model.arch = arch
  c.model.dtype = dtype
  c.model.options = ml_collections.ConfigDict(reference_overrides(arch, aux))
  c.model.scan_blocks = scan_blocks
  c.model.remat = 'blocks' if remat_blocks else 'none'
  c.data.crop_size = tuple(size)
  c.train.batch_size = batch
  c.mesh.shape = (devices // spatial, spatial) if spatial > 1 else (devices,)
  c.mesh.param_sharding = param_sharding
  return c


def jax_model(
  arch: str,
  *,
  batch: int,
  size: tuple[int, int],
  steps: int,
  dtype: str = 'float32',
  num_classes: int = 19,
  conv_lowering: str = 'auto',
  devices: int = 1,
  spatial: int = 1,
  param_sharding: str = 'replicated',
  scan_blocks: bool = False,
  remat_blocks: bool = False,
  aux: bool = False,
  profile_dir: str | None = None,
) -> dict[str, Any]:
  """Train and eval images/s, compile time, memory, FLOPs, MFU of the
  programs `scripts.train` runs (`programs.programs_of`: the same view, jit,
  shardings and donation) for `benchmark_config`'s run.

  `batch` is the global batch, split over the first `devices` devices
  (`('data',)` mesh; with `spatial > 1` a `(devices / spatial, spatial)`
  mesh that splits each image's height); `param_sharding` is
  `mesh.param_sharding`; `scan_blocks` and `remat_blocks` are
  `model.scan_blocks` and `model.remat='blocks'`. `conv_lowering` other
  than `'auto'` replaces the platform's choice of convolution kernels (a
  lever to measure). Eval is the training run's eval step (forward, argmax
  and the confusion matrix). With `profile_dir`, `PROFILE_STEPS` more
  train steps are traced there (TensorBoard / Perfetto) and the row gains
  the device kernel time per step by kind (`kernel_time_summary`).
  """
  # `compile_s` is a real compilation, even where the environment turns on
  # JAX's persistent cache (this runs in a process of its own).
  jax.config.update('jax_enable_compilation_cache', False)
  config = benchmark_config(
    arch,
    batch=batch,
    size=size,
    dtype=dtype,
    devices=devices,
    spatial=spatial,
    param_sharding=param_sharding,
    scan_blocks=scan_blocks,
    remat_blocks=remat_blocks,
    aux=aux,
  )
  mesh = sharding.make_mesh(config.mesh.shape)
  sharding.check_batch_size(batch, mesh)
  model = initialization.create_model(config, num_classes)
  # What was measured, read from the model: whether it has an aux head.
  has_aux = getattr(model, 'aux_head', None) is not None
  view = None
  if conv_lowering != 'auto' and spatial == 1:
    view = {'conv_lowering': conv_lowering}
  programs, params, stats = programs_of(
    config, model, num_classes, mesh, view=view
  )
  # Model FLOPs: the standard count of every convolution (XLA's own
  # lowering), whatever the lowering that runs performs (e.g. Winograd's
  # fewer multiplies on CPU).
  native = programs_of(
    config, model, num_classes, mesh, view={'conv_lowering': 'native'}
  )[0]
  state = programs.init(params, stats)
  del model, params, stats
  rng = np.random.RandomState(0)
  put = lambda x: jax.device_put(x, programs.data)
  train_in = {
    'image': put(rng.randint(0, 256, (batch, *size, 3)).astype(np.uint8)),
    'label': put(rng.randint(0, num_classes, (batch, *size)).astype(np.uint8)),
  }
  eval_in = {
    'image': put(rng.randn(batch, *size, 3).astype(np.float32)),
    'label': put(rng.randint(0, num_classes, (batch, *size)).astype(np.int32)),
    'mask': put(np.ones((batch, *size), bool)),
  }
  train_flops = program_flops(native.train, state, train_in)
  eval_flops = program_flops(
    native.eval, state.eval_params, state.batch_stats, eval_in
  )
  lowered_train = programs.train.lower(state, train_in)
  lowered_eval = programs.eval.lower(
    state.eval_params, state.batch_stats, eval_in
  )
  t = time.perf_counter()
  train_c = lowered_train.compile()
  compile_train = time.perf_counter() - t
  t = time.perf_counter()
  eval_c = lowered_eval.compile()
  compile_eval = time.perf_counter() - t

  holder = {'state': state}  # the train step donates its state

  def one_step():
    holder['state'], logs = train_c(holder['state'], train_in)
    return logs['loss']

  def one_eval():
    s = holder['state']
    return eval_c(s.eval_params, s.batch_stats, eval_in)

  train_s, _ = median_seconds(one_step, steps)
  eval_s, _ = median_seconds(one_eval, steps)
  kernels = {}
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(PROFILE_STEPS):
        jax.block_until_ready(one_step())
    kernels = kernel_time_summary(profile_dir, PROFILE_STEPS)
  peak, peak_source = peak_tflops(dtype)
  train_tflops = train_flops / train_s / 1e12
  return {
    'framework': 'jax',
    'arch': arch,
    'batch': batch,
    'devices': devices,
    'spatial': spatial,
    'param_sharding': param_sharding,
    'scan_blocks': scan_blocks,
    'remat_blocks': remat_blocks,
    'aux': has_aux,
    'size': f'{size[0]}x{size[1]}',
    'dtype': dtype,
    'device': jax.devices()[0].device_kind,
    'train_img_s': batch / train_s,
    'eval_img_s': batch / eval_s,
    'step_ms': train_s * 1e3,
    'compile_s': compile_train + compile_eval,
    'peak_mem_mb': peak_mem_mb(),
    'train_program_mb_per_device': program_mb(train_c),
    'gflops_per_img': eval_flops / batch / 1e9,
    'train_gflops_per_img': train_flops / batch / 1e9,
    'xla_gflops_per_img': xla_flops(lowered_eval) / batch / 1e9,
    'train_tflop_s': train_tflops,
    'eval_tflop_s': eval_flops / eval_s / 1e12,
    'peak_tflop_s': peak,
    'peak_source': peak_source,
    'train_mfu': train_tflops / peak,
    **kernels,
  }
