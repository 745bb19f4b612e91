"""Speed and memory measurements (used by scripts/benchmark.py, not tests).

`jax_model` times the train and eval steps that `scripts.train` runs
(built by `train.programs_of`) for one architecture; `torch_model` does the
same work with the PyTorch reference on the same shapes;
`input_pipeline` times the Grain training input.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import resource
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import base
from deeplab_jax import initialization, sharding, train
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.data import pipeline
from deeplab_jax.models import registry

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


def _peak_mem_mb() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, steps: int) -> float:
  """Median seconds per call after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _xla_flops(lowered) -> float:
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


def _program_flops(fn, *args) -> float:
  return matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _program_mb(compiled) -> float:
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
) -> ml_collections.ConfigDict:
  """The run a benchmark row measures: the base recipe's training (SGD
  with momentum, weight decay and the poly schedule, cross-entropy with
  255 ignored, uint8 pixels normalised in the step) for `arch` in its
  PyTorch reference's layout (`reference_overrides`), random weights."""
  c = base.get_base_config()
  c.model.arch = arch
  c.model.dtype = dtype
  c.model.options = ml_collections.ConfigDict(reference_overrides(arch))
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
  profile_dir: str | None = None,
) -> dict[str, Any]:
  """Train and eval images/s, compile time, memory, FLOPs, MFU of the
  programs `scripts.train` runs (`train.programs_of`: the same view, jit,
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
  )
  mesh = sharding.make_mesh(config.mesh.shape)
  sharding.check_batch_size(batch, mesh)
  model = initialization.create_model(config, num_classes)
  view = None
  if conv_lowering != 'auto' and spatial == 1:
    view = {'conv_lowering': conv_lowering}
  programs, params, stats = train.programs_of(
    config, model, num_classes, mesh, view=view
  )
  # Model FLOPs: the standard count of every convolution (XLA's own
  # lowering), whatever the lowering that runs performs (e.g. Winograd's
  # fewer multiplies on CPU).
  native = train.programs_of(
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
  train_flops = _program_flops(native.train, state, train_in)
  eval_flops = _program_flops(
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

  train_s = _time(one_step, steps)
  eval_s = _time(one_eval, steps)
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
    'size': f'{size[0]}x{size[1]}',
    'dtype': dtype,
    'device': jax.devices()[0].device_kind,
    'train_img_s': batch / train_s,
    'eval_img_s': batch / eval_s,
    'step_ms': train_s * 1e3,
    'compile_s': compile_train + compile_eval,
    'peak_mem_mb': _peak_mem_mb(),
    'train_program_mb_per_device': _program_mb(train_c),
    'gflops_per_img': eval_flops / batch / 1e9,
    'train_gflops_per_img': train_flops / batch / 1e9,
    'xla_gflops_per_img': _xla_flops(lowered_eval) / batch / 1e9,
    'train_tflop_s': train_tflops,
    'eval_tflop_s': eval_flops / eval_s / 1e12,
    'peak_tflop_s': peak,
    'peak_source': peak_source,
    'train_mfu': train_tflops / peak,
    **kernels,
  }


def reference_overrides(arch: str) -> dict[str, Any]:
  """Options that make `arch` the same network as `torch_reference(arch)`.

  The `deeplabv3plus_*` archs default to the paper's layout (plain ASPP at
  6/12/18 for ResNets); their PyTorch reference is smp's `DeepLabV3Plus`
  with its defaults, so both frameworks are measured in smp's layout.
  """
  if arch.startswith('deeplabv3plus_'):
    return torch_convert.smp_deeplabv3plus_options(resnet='resnet' in arch)
  if arch.startswith('denseaspp'):
    return {'align_corners': True}  # the official model's nn.Upsample
  return {}


def torch_reference(arch: str, num_classes: int):
  """The PyTorch model `arch` is checked against (needs the test extra)."""
  if arch.startswith(('deeplabv3_resnet', 'deeplabv3_mobilenet', 'lraspp_')):
    from torchvision.models import segmentation

    if hasattr(segmentation, arch):  # not e.g. our tiny test variants
      return getattr(segmentation, arch)(
        weights=None, weights_backbone=None, num_classes=num_classes
      )
  if arch.startswith('deeplabv3plus_'):
    import segmentation_models_pytorch as smp

    encoder = arch.removeprefix('deeplabv3plus_')
    encoder = 'tu-' + encoder if encoder.startswith('xception') else encoder
    return smp.DeepLabV3Plus(encoder, encoder_weights=None, classes=num_classes)
  if arch == 'denseaspp_mobilenet_v2':
    from deeplab_jax.convert import official_denseaspp_torch as official

    return official.OfficialMobileNetDenseASPP(num_classes)
  if arch.startswith('denseaspp'):
    from deeplab_jax.convert.official_denseaspp_torch import OfficialDenseASPP

    c = registry.make_config(arch)
    return OfficialDenseASPP(
      c.growth_rate, c.init_features, c.blocks, c.d0, c.d1, num_classes
    )
  raise ValueError(f'no PyTorch reference for {arch}')


def torch_model(
  arch: str,
  *,
  batch: int,
  size: tuple[int, int],
  steps: int,
  dtype: str = 'float32',
  num_classes: int = 19,
  compile_mode: str | None = None,
  profile_dir: str | None = None,
) -> dict[str, Any]:
  """The PyTorch reference on the same shapes, in its fastest eager
  settings: channels_last, AMP for bfloat16, cuDNN autotuning on GPU.
  `compile_mode` (e.g. `'max-autotune-no-cudagraphs'`) runs it under
  `torch.compile` instead (framework `torch_compile`; `compile_s` is the
  first train and inference calls less one step each). `profile_dir` as
  in `jax_model` (`torch.profiler`)."""
  import torch
  import torch.nn.functional as F

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  # Fixed shapes: let cuDNN time its algorithms once, as mmsegmentation does.
  torch.backends.cudnn.benchmark = True
  model = torch_reference(arch, num_classes).to(device)
  model = model.to(memory_format=torch.channels_last)
  # The work of `benchmark_config`'s JAX step: uint8 pixels normalised in
  # the step, cross-entropy with 255 ignored, SGD with momentum, coupled
  # weight decay and the poly schedule.
  c = benchmark_config(arch, batch=batch, size=size)
  pixels = torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8)
  pixels = pixels.to(device)
  mean = torch.tensor(c.data.mean, device=device).view(1, 3, 1, 1)
  inv_std = 1.0 / torch.tensor(c.data.std, device=device).view(1, 3, 1, 1)
  labels = torch.randint(0, num_classes, (batch, *size), device=device)
  opt = torch.optim.SGD(
    model.parameters(),
    lr=c.optim.lr,
    momentum=c.optim.momentum,
    weight_decay=c.optim.weight_decay,
  )
  poly = torch.optim.lr_scheduler.PolynomialLR(
    opt, total_iters=c.train.num_steps, power=c.optim.poly_power
  )

  def normalised():
    x = pixels.permute(0, 3, 1, 2).float()
    return ((x - mean) * inv_std).contiguous(memory_format=torch.channels_last)

  amp = dtype == 'bfloat16'
  # Train and eval mode are compiled separately (dynamo guards on it).
  run_model = torch.compile(model, mode=compile_mode) if compile_mode else model

  def out_of(x):
    out = run_model(x)
    return out['out'] if isinstance(out, dict) else out

  def sync():
    if device == 'cuda':
      torch.cuda.synchronize()

  def train():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
      loss = F.cross_entropy(out_of(normalised()), labels, ignore_index=255)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    poly.step()
    sync()

  @torch.no_grad()
  def infer():  # the eval step: forward, argmax, confusion matrix
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
      pred = out_of(normalised()).argmax(1)
    torch.bincount(
      labels.flatten() * num_classes + pred.flatten(),
      minlength=num_classes**2,
    )
    sync()

  first_calls = []

  def timed(fn):
    t = time.perf_counter()
    fn()
    first_calls.append(time.perf_counter() - t)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return float(np.median(times))

  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  model.train()
  train_s = timed(train)
  kernels = {}
  if profile_dir:
    kernels = _torch_profile(train, profile_dir)
  model.eval()
  infer_s = timed(infer)
  compile_s = first_calls[0] - train_s + first_calls[1] - infer_s
  peak = (
    torch.cuda.max_memory_allocated() / 2**20
    if device == 'cuda'
    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  )
  return {
    'framework': 'torch_compile' if compile_mode else 'torch',
    'compile_mode': compile_mode,
    'arch': arch,
    'batch': batch,
    'size': f'{size[0]}x{size[1]}',
    'dtype': dtype,
    'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
    'train_img_s': batch / train_s,
    'eval_img_s': batch / infer_s,
    'compile_s': compile_s if compile_mode else 0.0,
    'peak_mem_mb': peak,
    'gflops_per_img': float('nan'),
    **kernels,
  }


def _torch_profile(step, profile_dir: str) -> dict[str, Any]:
  """Traces `PROFILE_STEPS` calls of `step` with `torch.profiler` into
  `profile_dir/torch_trace.json.gz` and summarises its kernels."""

  import torch

  activities = [torch.profiler.ProfilerActivity.CPU]
  if torch.cuda.is_available():
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  os.makedirs(profile_dir, exist_ok=True)
  with torch.profiler.profile(activities=activities) as prof:
    for _ in range(PROFILE_STEPS):
      step()
  raw = os.path.join(profile_dir, 'torch_trace.json')
  prof.export_chrome_trace(raw)
  with open(raw, 'rb') as src, gzip.open(raw + '.gz', 'wb') as dst:
    shutil.copyfileobj(src, dst)
  os.remove(raw)
  return kernel_time_summary(profile_dir, PROFILE_STEPS)


def input_pipeline(
  dataset: str,
  data_dir: str,
  *,
  crop: tuple[int, int],
  batch: int,
  workers: int,
  batches: int,
) -> dict[str, Any]:
  """Training-input images/s with `workers` Grain worker processes."""

  cfg = pipeline.TrainInputConfig(
    dataset=dataset,
    data_dir=data_dir,
    global_batch_size=batch,
    crop_size=crop,
    num_workers=workers,
    photometric=True,
  )
  it = iter(pipeline.train_dataset(cfg, process_index=0, process_count=1)[0])
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - t
  return {
    'framework': 'grain',
    'dataset': dataset,
    'workers': workers,
    'crop': f'{crop[0]}x{crop[1]}',
    'input_img_s': batches * batch / elapsed,
  }
