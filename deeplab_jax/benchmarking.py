"""Speed and memory measurements (used by scripts/benchmark.py, not tests).

`jax_model` times the jitted train step (forward, cross-entropy, backward,
SGD momentum update, state donated) and inference of one architecture;
`torch_model` does the same for the PyTorch reference on the same shapes;
`input_pipeline` times the Grain training input.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deeplab_jax import losses, models

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


def _flops(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


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
  param_sharding: str = 'replicated',
) -> dict[str, Any]:
  """Train and inference images/s, compile time, memory, FLOPs, MFU.

  `batch` is the global batch, split over the first `devices` devices
  (`('data',)` mesh); `param_sharding` is the train state's rule
  (`sharding.state_shardings`).
  """
  from deeplab_jax import sharding

  mesh = sharding.make_mesh((devices,))
  sharding.check_batch_size(batch, mesh)
  model = models.create(
    arch, num_classes=num_classes, rngs=nnx.Rngs(0), dtype=dtype
  )
  model = nnx.view(model, conv_lowering=conv_lowering)
  train_model = nnx.view(model, deterministic=True)
  eval_model = nnx.view(model, deterministic=True, use_running_average=True)
  graphdef, params, rest = nnx.split(train_model, nnx.Param, ...)
  eval_graphdef = nnx.split(eval_model, nnx.Param, ...)[0]
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  tx = optax.sgd(0.01, momentum=0.9)
  rng = np.random.RandomState(0)
  data = sharding.data_sharding(mesh)
  images = jax.device_put(rng.randn(batch, *size, 3).astype(np.float32), data)
  labels = jax.device_put(
    rng.randint(0, num_classes, (batch, *size)).astype(np.int32), data
  )

  def train_step(state, images, labels):
    params, rest, opt_state = state

    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      out = m(images)
      _, _, new_rest = nnx.split(m, nnx.Param, ...)
      return losses.cross_entropy(out['out'], labels), nnx.to_pure_dict(
        new_rest
      )

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), rest, opt_state), loss

  def infer(params, rest, images):
    return nnx.merge(eval_graphdef, params, rest)(images)['out']

  state = (params, rest, tx.init(params))
  state_sh = sharding.state_shardings(state, mesh, param_sharding)
  state = jax.device_put(state, state_sh)
  # The train step donates its state; inference keeps its own copy.
  infer_params, infer_rest = jax.tree.map(
    jnp.copy, jax.device_put((params, rest), sharding.replicated(mesh))
  )
  # FLOPs from the lowered (backend-independent) program: after compilation
  # GPU convolutions are library calls that XLA's cost analysis skips.
  lowered_infer = jax.jit(infer).lower(infer_params, infer_rest, images)
  lowered_train = jax.jit(
    train_step,
    donate_argnums=0,
    out_shardings=(state_sh, sharding.replicated(mesh)),
  ).lower(state, images, labels)
  t = time.perf_counter()
  train_c = lowered_train.compile()
  compile_train = time.perf_counter() - t
  t = time.perf_counter()
  infer_c = lowered_infer.compile()
  compile_infer = time.perf_counter() - t

  holder = {'state': state}

  def one_step():
    holder['state'], loss = train_c(holder['state'], images, labels)
    return loss

  train_s = _time(one_step, steps)
  infer_s = _time(lambda: infer_c(infer_params, infer_rest, images), steps)
  train_flops, infer_flops = _flops(lowered_train), _flops(lowered_infer)
  peak, peak_source = peak_tflops(dtype)
  train_tflops = train_flops / train_s / 1e12
  return {
    'framework': 'jax',
    'arch': arch,
    'batch': batch,
    'devices': devices,
    'param_sharding': param_sharding,
    'size': f'{size[0]}x{size[1]}',
    'dtype': dtype,
    'device': jax.devices()[0].device_kind,
    'train_img_s': batch / train_s,
    'eval_img_s': batch / infer_s,
    'step_ms': train_s * 1e3,
    'compile_s': compile_train + compile_infer,
    'peak_mem_mb': _peak_mem_mb(),
    'train_program_mb_per_device': _program_mb(train_c),
    'gflops_per_img': infer_flops / batch / 1e9,
    'train_gflops_per_img': train_flops / batch / 1e9,
    'train_tflop_s': train_tflops,
    'eval_tflop_s': infer_flops / infer_s / 1e12,
    'peak_tflop_s': peak,
    'peak_source': peak_source,
    'train_mfu': train_tflops / peak,
  }


def torch_reference(arch: str, num_classes: int):
  """The PyTorch model `arch` is checked against (needs the test extra)."""
  if arch.startswith('deeplabv3_resnet'):
    from torchvision.models import segmentation

    return getattr(segmentation, arch)(
      weights=None, weights_backbone=None, num_classes=num_classes
    )
  if arch.startswith('deeplabv3plus_'):
    import segmentation_models_pytorch as smp

    encoder = arch.removeprefix('deeplabv3plus_')
    encoder = 'tu-' + encoder if encoder.startswith('xception') else encoder
    return smp.DeepLabV3Plus(encoder, encoder_weights=None, classes=num_classes)
  if arch.startswith('denseaspp'):
    from deeplab_jax.models import registry
    from tests.denseaspp_refs import OfficialDenseASPP

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
) -> dict[str, Any]:
  """The PyTorch reference on the same shapes: channels_last, AMP for
  bfloat16 (its fastest settings)."""
  import torch
  import torch.nn.functional as F

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = torch_reference(arch, num_classes).to(device)
  model = model.to(memory_format=torch.channels_last)
  images = torch.randn(batch, 3, *size, device=device).to(
    memory_format=torch.channels_last
  )
  labels = torch.randint(0, num_classes, (batch, *size), device=device)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  amp = dtype == 'bfloat16'

  def out_of(x):
    out = model(x)
    return out['out'] if isinstance(out, dict) else out

  def sync():
    if device == 'cuda':
      torch.cuda.synchronize()

  def train():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
      loss = F.cross_entropy(out_of(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync()

  @torch.no_grad()
  def infer():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
      out_of(images)
    sync()

  def timed(fn):
    fn()
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
  model.eval()
  infer_s = timed(infer)
  peak = (
    torch.cuda.max_memory_allocated() / 2**20
    if device == 'cuda'
    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  )
  return {
    'framework': 'torch',
    'arch': arch,
    'batch': batch,
    'size': f'{size[0]}x{size[1]}',
    'dtype': dtype,
    'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
    'train_img_s': batch / train_s,
    'eval_img_s': batch / infer_s,
    'compile_s': 0.0,
    'peak_mem_mb': peak,
    'gflops_per_img': float('nan'),
  }


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
  from deeplab_jax.data import pipeline

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
