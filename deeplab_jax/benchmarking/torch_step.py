"""Measures the PyTorch reference doing the same work as `jax_step`."""

from __future__ import annotations

import gzip
import os
import resource
import shutil
from typing import Any

from deeplab_jax.benchmarking.jax_step import benchmark_config
from deeplab_jax.benchmarking.reference import torch_reference
from deeplab_jax.benchmarking.timing import median_seconds
from deeplab_jax.benchmarking.traces import PROFILE_STEPS, kernel_time_summary


def torch_model(
  arch: str,
  *,
  batch: int,
  size: tuple[int, int],
  steps: int,
  dtype: str = 'float32',
  num_classes: int = 19,
  compile_mode: str | None = None,
  aux: bool = False,
  profile_dir: str | None = None,
) -> dict[str, Any]:
  """The PyTorch reference on the same shapes, in its fastest eager
  settings: channels_last, AMP for bfloat16, cuDNN autotuning on GPU.
  `compile_mode` (e.g. `'max-autotune-no-cudagraphs'`) runs it under
  `torch.compile` instead (framework `torch_compile`; `compile_s` is the
  first train and inference calls less one step each). `profile_dir` as
  in `jax_model` (`torch.profiler`); `aux` adds the auxiliary head and its
  loss, as `jax_model`'s."""
  import torch
  import torch.nn.functional as F

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  # Fixed shapes: let cuDNN time its algorithms once, as mmsegmentation does.
  torch.backends.cudnn.benchmark = True
  model = torch_reference(arch, num_classes, aux).to(device)
  model = model.to(memory_format=torch.channels_last)
  # The work of `benchmark_config`'s JAX step: uint8 pixels normalised in
  # the step, cross-entropy with 255 ignored, SGD with momentum, coupled
  # weight decay and the poly schedule.
  c = benchmark_config(arch, batch=batch, size=size, aux=aux)
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
      out = run_model(normalised())
      if not isinstance(out, dict):
        out = {'out': out}
      ce = lambda logits: F.cross_entropy(logits, labels, ignore_index=255)
      loss = ce(out['out'])
      if aux:
        loss = loss + c.loss.aux_weight * ce(out['aux'])
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

  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  model.train()
  train_s, first_train = median_seconds(train, steps)
  kernels = {}
  if profile_dir:
    kernels = _torch_profile(train, profile_dir)
  model.eval()
  if aux:  # evaluation reads the main head only, as ours does
    model.aux_classifier = None
  infer_s, first_infer = median_seconds(infer, steps)
  compile_s = first_train - train_s + first_infer - infer_s
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
