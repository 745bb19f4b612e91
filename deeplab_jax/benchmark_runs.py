"""What `scripts.benchmark` runs: every measurement of `benchmarking` in a
fresh child process, and the markdown tables of the results.

A child process per measurement gives each model and framework its own
memory peak (device `peak_bytes_in_use`, or process RSS on CPU) and its
own JAX start-up (`JAX_NUM_CPU_DEVICES` is read then).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from deeplab_jax import benchmarking
from deeplab_jax.data import datasets
from deeplab_jax.data.builders import synthetic

# glibc malloc tuned to keep large step buffers mapped: without it glibc
# returns and page-faults them every step (docs/benchmarks.md has the
# figures). Read by each child's libc at start-up.
GLIBC_TUNABLES = (
  'glibc.malloc.mmap_threshold=4294967296:'
  'glibc.malloc.trim_threshold=68719476736:'
  'glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1'
)

RESULT_COLUMNS = (
  'framework',
  'arch',
  'device',
  'devices',
  'spatial',
  'param_sharding',
  'batch',
  'size',
  'dtype',
  'train_img_s',
  'eval_img_s',
  'step_ms',
  'compile_s',
  'peak_mem_mb',
  'train_program_mb_per_device',
  'gflops_per_img',
  'train_mfu',
)
KERNEL_KINDS = ('conv', 'matmul', 'norm', 'copy', 'other', 'total')


def isolated(fn: Callable[..., Any], **kwargs) -> Any:
  """`fn(**kwargs)` in a fresh spawned process."""
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
    return pool.submit(fn, **kwargs).result()


def model_rows(
  archs: Sequence[str],
  *,
  device_counts: Sequence[int],
  param_shardings: Sequence[str],
  spatial_sizes: Sequence[int] = (1,),
  batch_per_device: int,
  size: tuple[int, int],
  steps: int,
  dtype: str,
  conv_lowering: str = 'auto',
  scan_blocks: bool = False,
  torch: bool = False,
  tune_malloc: bool = True,
  profile_dir: str | None = None,
) -> Iterator[dict[str, Any]]:
  """One result row per (arch, device count, spatial size, sharding rule),
  then the PyTorch reference's row (same batch and size as the last JAX
  row, with `jax_train_ratio` / `jax_eval_ratio`), yielded as each
  finishes. A spatial size that does not divide a device count is
  skipped."""
  if tune_malloc:
    os.environ.setdefault('GLIBC_TUNABLES', GLIBC_TUNABLES)
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', str(max(device_counts)))

  def profile(name):
    return (
      {'profile_dir': os.path.join(profile_dir, name)} if profile_dir else {}
    )

  for arch in archs:
    row = None
    for n, s, rule in itertools.product(
      device_counts, spatial_sizes, param_shardings
    ):
      if n % s:
        continue  # S devices split each image: S must divide the count
      # `batch_per_device` images per data-axis slot: S devices share them.
      kw = dict(batch=batch_per_device * n // s, size=size, steps=steps)
      row = isolated(
        benchmarking.jax_model,
        arch=arch,
        conv_lowering=conv_lowering,
        scan_blocks=scan_blocks,
        devices=n,
        spatial=s,
        param_sharding=rule,
        dtype=dtype,
        **profile(f'jax_{arch}_{dtype}_d{n}_s{s}_{rule}'),
        **kw,
      )
      yield row
    if torch:
      ref = isolated(
        benchmarking.torch_model,
        arch=arch,
        **profile(f'torch_{arch}_{dtype}'),
        dtype=dtype,
        **kw,
      )
      ref['jax_train_ratio'] = row['train_img_s'] / ref['train_img_s']
      ref['jax_eval_ratio'] = row['eval_img_s'] / ref['eval_img_s']
      yield ref


def input_pipeline_rows(workers: Sequence[int]) -> Iterator[dict[str, Any]]:
  """Input pipeline throughput on 16 generated Cityscapes-size images
  (1024x2048, crops of 512x1024, batch 8), one row per worker count."""
  with tempfile.TemporaryDirectory() as tmp:
    raw, data_dir = os.path.join(tmp, 'raw'), os.path.join(tmp, 'tfds')
    _cityscapes_size_folder(raw)
    datasets.prepare('image_folder', data_dir=data_dir, manual_dir=raw)
    for w in workers:
      yield benchmarking.input_pipeline(
        'image_folder',
        data_dir,
        crop=(512, 1024),
        batch=8,
        workers=int(w),
        batches=8,
      )


def _cityscapes_size_folder(root: str) -> None:
  """16 generated 1024x2048 PNG pairs as an image-folder data set."""
  os.makedirs(os.path.join(root, 'train', 'images'))
  os.makedirs(os.path.join(root, 'train', 'masks'))
  with open(os.path.join(root, 'classes.txt'), 'w') as f:
    f.write('\n'.join(synthetic.CLASSES))
  for i in range(16):
    image, label = synthetic.render(i, 0, 1024, 2048)
    Image.fromarray(image).save(
      os.path.join(root, 'train', 'images', f'{i}.png')
    )
    Image.fromarray(np.asarray(label)).save(
      os.path.join(root, 'train', 'masks', f'{i}.png')
    )


def results_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as a markdown table of `RESULT_COLUMNS`."""
  lines = [
    '| ' + ' | '.join(RESULT_COLUMNS) + ' |',
    '|' + '---|' * len(RESULT_COLUMNS),
  ]
  for r in rows:
    cells = []
    for k in RESULT_COLUMNS:
      v = r.get(k, '')
      cells.append(f'{v:.2f}' if isinstance(v, float) else str(v))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def kernel_table(rows: Sequence[dict[str, Any]]) -> str:
  """Device kernel ms per train step by kind, next to the step time, for
  the profiled rows."""
  lines = [
    '| framework | arch | dtype | step ms | '
    + ' | '.join(f'{k} ms' for k in KERNEL_KINDS)
    + ' |',
    '|' + '---|' * (len(KERNEL_KINDS) + 4),
  ]
  for r in rows:
    ms = r['kernel_ms_per_step']
    step = 1e3 * r['batch'] / r['train_img_s']
    cells = [f'{ms.get(k, 0.0):.1f}' for k in KERNEL_KINDS]
    lines.append(
      f'| {r["framework"]} | {r["arch"]} | {r["dtype"]} | {step:.1f} | '
      + ' | '.join(cells)
      + ' |'
    )
  return '\n'.join(lines)


def print_rows(rows: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
  """Prints each row as one JSON line as it comes, then the tables."""
  done = []
  for row in rows:
    print(json.dumps(row), flush=True)
    done.append(row)
  if done and 'train_img_s' in done[0]:
    print(results_table(done))
    profiled = [r for r in done if 'kernel_ms_per_step' in r]
    if profiled:
      print(kernel_table(profiled))
  return done
