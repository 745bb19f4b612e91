"""What `scripts.benchmark` runs: every measurement of `benchmarking` in a
fresh child process, and the markdown tables of the results.

A child process per measurement gives each model and framework its own
memory peak (device `peak_bytes_in_use`, or process RSS on CPU) and its
own JAX start-up (`JAX_NUM_CPU_DEVICES` is read then).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from deeplab_jax import benchmarking
from deeplab_jax.data import datasets
from deeplab_jax.data.builders import synthetic

# glibc malloc tuned to keep large step buffers mapped: without it glibc
# returns and page-faults them every step (docs/benchmarks.md has the
# figures; one arena for all threads, `arena_max=1`, made small models'
# steps bimodal there). Read by each child's libc at start-up.
GLIBC_TUNABLES = (
  'glibc.malloc.mmap_threshold=4294967296:'
  'glibc.malloc.trim_threshold=68719476736:'
  'glibc.malloc.hugetlb=1'
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
  'error',
)
KERNEL_KINDS = ('conv', 'matmul', 'norm', 'copy', 'other', 'total')


# `--table gpu`: the GPU table on one device, the most wanted rows
# first, so that a lease cut short still returns them (`--deadline_s`).
TABLES = {
  'gpu': (
    dict(
      archs=('deeplabv3plus_resnet101',),
      batches=(8,),
      frameworks=('jax', 'torch', 'torch_compile'),
    ),
    dict(
      archs=('deeplabv3_resnet101', 'denseaspp161'),
      batches=(8,),
      frameworks=('jax', 'torch'),
    ),
    dict(
      archs=('deeplabv3plus_resnet101',),
      batches=(16, 32),
      frameworks=('jax', 'torch'),
      remat_blocks=True,
    ),
    # DenseNet's dense layers scanned: sets DenseNet's GPU default.
    dict(
      archs=('denseaspp161',),
      batches=(8,),
      frameworks=('jax',),
      scan_blocks=True,
    ),
  ),
  # The same mechanism at CPU test sizes (torch.compile is left out: it
  # compiles for minutes on CPU).
  'tiny': (
    dict(
      archs=('deeplabv3_resnet_tiny',),
      batches=(1, 2),
      frameworks=('jax',),
    ),
    dict(
      archs=('lraspp_mobilenet_v3_large',),
      batches=(1, 2),
      frameworks=('torch',),
    ),
  ),
}
TABLE_SETTINGS = {
  'gpu': dict(size=(512, 1024), dtype='bfloat16', steps=10),
  'tiny': dict(size=(64, 64), dtype='float32', steps=1),
}
FRAMEWORKS = ('jax', 'torch', 'torch_compile')
TORCH_COMPILE_MODE = 'max-autotune-no-cudagraphs'


def _child(conn, fn, kwargs) -> None:
  try:
    conn.send(('ok', fn(**kwargs)))
  except BaseException as e:  # noqa: BLE001 - reported as the row
    line = (str(e).strip().splitlines() or [''])[0][:300]
    conn.send(('error', f'{type(e).__name__}: {line}'))


def isolated(fn: Callable[..., Any], timeout: float | None = None, **kwargs):
  """`fn(**kwargs)` in a fresh spawned process. An exception there (e.g.
  out of memory), a crash, or running past `timeout` seconds (the process
  is then killed) comes back as `{'error': one line}`."""
  ctx = multiprocessing.get_context('spawn')
  parent, child = ctx.Pipe(duplex=False)
  proc = ctx.Process(target=_child, args=(child, fn, kwargs))
  proc.start()
  child.close()
  try:
    if not parent.poll(None if timeout is None else max(timeout, 0.0)):
      return {'error': f'stopped at the deadline, after {timeout:.0f} s'}
    status, value = parent.recv()
  except EOFError:
    proc.join()
    return {'error': f'the measurement process died (exit {proc.exitcode})'}
  finally:
    if proc.is_alive():
      proc.kill()
    proc.join()
  return value if status == 'ok' else {'error': value}


def model_rows(
  archs: Sequence[str],
  *,
  device_counts: Sequence[int] = (1,),
  param_shardings: Sequence[str] = ('replicated',),
  spatial_sizes: Sequence[int] = (1,),
  batches: Sequence[int],
  size: tuple[int, int],
  steps: int,
  dtype: str,
  frameworks: Sequence[str] = ('jax',),
  conv_lowering: str = 'auto',
  scan_blocks: bool = False,
  remat_blocks: bool = False,
  aux: bool = False,
  tune_malloc: bool = True,
  profile_dir: str | None = None,
  deadline: float | None = None,
) -> Iterator[dict[str, Any]]:
  """Result rows, yielded as each measurement finishes: per arch and batch
  (images per data-axis slot), one JAX row per (device count, spatial size,
  sharding rule) with `'jax'` in `frameworks`, then PyTorch eager
  (`'torch'`) and `torch.compile` (`'torch_compile'`) rows on the same
  batch and size as the last JAX row (with `jax_train_ratio` /
  `jax_eval_ratio` when there is one). A spatial size that does not divide
  a device count is skipped. A measurement that fails, or that would run
  past `deadline` (`time.monotonic()`), is a row with `error`. `aux`
  trains the auxiliary head too, in both frameworks."""
  unknown = set(frameworks) - set(FRAMEWORKS)
  if unknown:
    raise ValueError(
      f'unknown frameworks {sorted(unknown)}; known: {FRAMEWORKS}'
    )
  if tune_malloc:
    os.environ.setdefault('GLIBC_TUNABLES', GLIBC_TUNABLES)
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', str(max(device_counts)))

  def measure(fn, framework, name, **kw):
    timeout = None if deadline is None else deadline - time.monotonic()
    if timeout is not None and timeout <= 0:
      row = {'error': 'skipped: past the deadline'}
    else:
      if profile_dir:
        kw['profile_dir'] = os.path.join(profile_dir, name)
      row = isolated(fn, timeout=timeout, **kw)
    if 'error' in row:
      row = {'framework': framework, **kw, **row}
      row['size'] = f'{size[0]}x{size[1]}'
      row.pop('profile_dir', None)
    return row

  for arch, per_slot in itertools.product(archs, batches):
    jax_row = None
    if 'jax' in frameworks:
      for n, s, rule in itertools.product(
        device_counts, spatial_sizes, param_shardings
      ):
        if n % s:
          continue  # S devices split each image: S must divide the count
        # `per_slot` images per data-axis slot: S devices share them.
        kw = dict(arch=arch, batch=per_slot * n // s, size=size, steps=steps)
        jax_row = measure(
          benchmarking.jax_model,
          'jax',
          f'jax_{arch}_{dtype}_b{per_slot}_d{n}_s{s}_{rule}',
          conv_lowering=conv_lowering,
          scan_blocks=scan_blocks,
          remat_blocks=remat_blocks,
          aux=aux,
          devices=n,
          spatial=s,
          param_sharding=rule,
          dtype=dtype,
          **kw,
        )
        yield jax_row
    batch = jax_row['batch'] if jax_row else per_slot
    for framework in ('torch', 'torch_compile'):
      if framework not in frameworks:
        continue
      mode = TORCH_COMPILE_MODE if framework == 'torch_compile' else None
      ref = measure(
        benchmarking.torch_model,
        framework,
        f'{framework}_{arch}_{dtype}_b{batch}',
        arch=arch,
        batch=batch,
        size=size,
        steps=steps,
        dtype=dtype,
        compile_mode=mode,
        aux=aux,
      )
      if jax_row and 'error' not in jax_row and 'error' not in ref:
        ref['jax_train_ratio'] = jax_row['train_img_s'] / ref['train_img_s']
        ref['jax_eval_ratio'] = jax_row['eval_img_s'] / ref['eval_img_s']
      yield ref


def table_rows(
  name: str, *, frameworks: Sequence[str], **options
) -> Iterator[dict[str, Any]]:
  """The rows of `TABLES[name]` at its `TABLE_SETTINGS`, keeping only the
  measurements of `frameworks` (a JAX-only or PyTorch-only phase);
  `options` go to `model_rows` (e.g. `deadline`)."""
  for group in TABLES[name]:
    chosen = [f for f in group['frameworks'] if f in frameworks]
    if chosen:
      yield from model_rows(
        **{**group, **TABLE_SETTINGS[name], **options, 'frameworks': chosen}
      )


def input_pipeline_rows(workers: Sequence[int]) -> Iterator[dict[str, Any]]:
  """Input pipeline throughput on 16 generated Cityscapes-size images
  (1024x2048 PNGs, crops of 512x1024, batch 8): first what one core does
  per image (decode, augment), then one steady-state row per worker count
  (48 batches, the last 24 timed)."""
  with tempfile.TemporaryDirectory() as tmp:
    raw, data_dir = os.path.join(tmp, 'raw'), os.path.join(tmp, 'tfds')
    _cityscapes_size_folder(raw)
    datasets.prepare('image_folder', data_dir=data_dir, manual_dir=raw)
    yield benchmarking.decode_and_augment(
      'image_folder', data_dir, crop=(512, 1024), images=32
    )
    for w in workers:
      yield benchmarking.input_pipeline(
        'image_folder',
        data_dir,
        crop=(512, 1024),
        batch=8,
        workers=int(w),
        batches=48,
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


INPUT_COLUMNS = (
  'framework',
  'workers',
  'crop',
  'input_img_s',
  'decode_ms_per_img',
  'augment_ms_per_img',
)


def input_table(rows: Sequence[dict[str, Any]]) -> str:
  """The input pipeline rows as a markdown table of `INPUT_COLUMNS`."""
  lines = [
    '| ' + ' | '.join(INPUT_COLUMNS) + ' |',
    '|' + '---|' * len(INPUT_COLUMNS),
  ]
  for r in rows:
    cells = [
      f'{r[k]:.1f}' if isinstance(r.get(k), float) else str(r.get(k, ''))
      for k in INPUT_COLUMNS
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def print_rows(
  rows: Iterator[dict[str, Any]], output: str | None = None
) -> list[dict[str, Any]]:
  """Prints each row as one JSON line as it comes (and appends it to the
  JSON-lines file `output`, flushed to disk: a run cut short keeps every
  finished row), then the tables."""
  done = []
  for row in rows:
    line = json.dumps(row)
    print(line, flush=True)
    if output:
      with open(output, 'a') as f:
        f.write(line + '\n')
        f.flush()
        os.fsync(f.fileno())
    done.append(row)
  if done and any('train_img_s' in r or 'error' in r for r in done):
    print(results_table(done))
    profiled = [r for r in done if 'kernel_ms_per_step' in r]
    if profiled:
      print(kernel_table(profiled))
  inputs = [r for r in done if 'input_img_s' in r]
  if inputs:
    print(input_table(inputs))
  return done
