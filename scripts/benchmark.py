r"""Measures training / inference speed and memory, JAX vs PyTorch, in one run.

  python -m scripts.benchmark --arch deeplabv3_resnet50 --batch 2 \
      --size 512x512 --steps 5 [--dtype bfloat16] [--torch]
  python -m scripts.benchmark --arch deeplabv3_resnet_tiny --batch 1 \
      --devices 1,2,4,8 --param_sharding replicated,fsdp   # scaling
  python -m scripts.benchmark --data --workers 0,1,2   # input pipeline

Every measurement runs in a fresh child process, so peak memory (device
`peak_bytes_in_use`, or process RSS on CPU) belongs to that one model and
framework. Prints one JSON object per measurement (`framework`, `arch`,
`batch`, `size`, `dtype`, `train_img_s`, `eval_img_s`, `peak_mem_mb`,
`gflops_per_img`, `train_tflop_s`, `train_mfu`, ...) and a markdown table.
`--torch` needs the test extra. On CPU, `--devices N` simulates N devices
(JAX_NUM_CPU_DEVICES) unless that variable is already set.
"""

import concurrent.futures
import json
import multiprocessing
import os
import tempfile

from absl import flags

from deeplab_jax.cli import entry_point, run

_ARCH = flags.DEFINE_list('arch', ['deeplabv3_resnet50'], 'Architectures.')
_BATCH = flags.DEFINE_integer(
  'batch', 2, 'Images per device (global batch = batch x devices).'
)
_DEVICES = flags.DEFINE_list('devices', ['1'], 'Data-parallel device counts.')
_PARAM_SHARDING = flags.DEFINE_list(
  'param_sharding', ['replicated'], 'Train-state rules: replicated, fsdp.'
)
_SIZE = flags.DEFINE_string('size', '512x512', 'Input HxW.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (median).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], '')
_TORCH = flags.DEFINE_bool('torch', False, 'Also run the PyTorch reference.')
_LOWERING = flags.DEFINE_enum(
  'conv_lowering',
  'auto',
  # models.conv_lowering.LOWERINGS, spelled out: importing it would start JAX
  # before --devices can set JAX_NUM_CPU_DEVICES.
  ['auto', 'native', 'im2col', 'taps', 'winograd'],
  'JAX convolution lowering (models.conv_lowering.conv2d); auto picks per '
  'shape.',
)
_MALLOC = flags.DEFINE_bool(
  'tune_malloc',
  True,
  'Run both frameworks with glibc malloc tuned to keep large step buffers '
  'mapped (GLIBC_TUNABLES; see docs/benchmarks.md).',
)
_PROFILE = flags.DEFINE_string(
  'profile_dir',
  None,
  'Trace a few extra train steps of every measurement into a folder here '
  '(TensorBoard / Perfetto) and report device kernel ms per step by kind.',
)
_DATA = flags.DEFINE_bool('data', False, 'Benchmark the input pipeline.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'Grain workers.')


# Without it glibc returns and page-faults the step's large buffers every
# step (measured: JAX 512x512 train 10.5 -> 6.5 s/step, PyTorch 7.2 -> 5.1).
GLIBC_TUNABLES = (
  'glibc.malloc.mmap_threshold=4294967296:'
  'glibc.malloc.trim_threshold=68719476736:'
  'glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1'
)


def _table(rows):
  keys = [
    'framework',
    'arch',
    'device',
    'devices',
    'param_sharding',
    'batch',
    'size',
    'dtype',
    'train_img_s',
    'eval_img_s',
    'peak_mem_mb',
    'gflops_per_img',
    'train_mfu',
  ]
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  for r in rows:
    cells = []
    for k in keys:
      v = r.get(k, '')
      cells.append(f'{v:.2f}' if isinstance(v, float) else str(v))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _kernel_table(rows):
  """Device kernel ms per train step by kind, next to the step time."""
  kinds = ['conv', 'matmul', 'norm', 'copy', 'other', 'total']
  lines = [
    '| framework | arch | dtype | step ms | '
    + ' | '.join(f'{k} ms' for k in kinds)
    + ' |',
    '|' + '---|' * (len(kinds) + 4),
  ]
  for r in rows:
    ms = r['kernel_ms_per_step']
    step = 1e3 * r['batch'] / r['train_img_s']
    cells = [f'{ms.get(k, 0.0):.1f}' for k in kinds]
    lines.append(
      f'| {r["framework"]} | {r["arch"]} | {r["dtype"]} | {step:.1f} | '
      + ' | '.join(cells)
      + ' |'
    )
  return '\n'.join(lines)


def _cityscapes_size_folder(root):
  """16 generated 1024x2048 PNG pairs as an image-folder data set."""
  import numpy as np
  from PIL import Image

  from deeplab_jax.data.builders import synthetic

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


def _profile_kw(name):
  if not _PROFILE.value:
    return {}
  return {'profile_dir': os.path.join(_PROFILE.value, name)}


def _isolated(fn, **kwargs):
  """`fn(**kwargs)` in a fresh spawned process (own memory peak)."""
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
    return pool.submit(fn, **kwargs).result()


@entry_point
def main(argv):
  del argv
  from deeplab_jax import benchmarking

  rows = []
  if _DATA.value:
    from deeplab_jax.data import datasets

    with tempfile.TemporaryDirectory() as tmp:
      _cityscapes_size_folder(os.path.join(tmp, 'raw'))
      datasets.prepare(
        'image_folder',
        data_dir=os.path.join(tmp, 'tfds'),
        manual_dir=os.path.join(tmp, 'raw'),
      )
      for w in _WORKERS.value:
        row = benchmarking.input_pipeline(
          'image_folder',
          os.path.join(tmp, 'tfds'),
          crop=(512, 1024),
          batch=8,
          workers=int(w),
          batches=8,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return
  size = tuple(int(v) for v in _SIZE.value.split('x'))
  if _MALLOC.value:  # read by each spawned child's libc at start-up
    os.environ.setdefault('GLIBC_TUNABLES', GLIBC_TUNABLES)
  counts = [int(n) for n in _DEVICES.value]
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', str(max(counts)))
  for arch in _ARCH.value:
    for n in counts:
      for rule in _PARAM_SHARDING.value:
        kw = dict(
          batch=_BATCH.value * n,
          size=size,
          steps=_STEPS.value,
          dtype=_DTYPE.value,
        )
        row = _isolated(
          benchmarking.jax_model,
          arch=arch,
          conv_lowering=_LOWERING.value,
          devices=n,
          param_sharding=rule,
          **_profile_kw(f'jax_{arch}_{_DTYPE.value}_d{n}_{rule}'),
          **kw,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    if _TORCH.value:
      ref = _isolated(
        benchmarking.torch_model,
        arch=arch,
        **_profile_kw(f'torch_{arch}_{_DTYPE.value}'),
        **kw,
      )
      jax_row = rows[-1]
      ref['jax_train_ratio'] = jax_row['train_img_s'] / ref['train_img_s']
      ref['jax_eval_ratio'] = jax_row['eval_img_s'] / ref['eval_img_s']
      print(json.dumps(ref), flush=True)
      rows.append(ref)
  print(_table(rows))
  profiled = [r for r in rows if 'kernel_ms_per_step' in r]
  if profiled:
    print(_kernel_table(profiled))


if __name__ == '__main__':
  # JAX and PyTorch share the GPU in one process: no preallocation.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  flags.FLAGS(['benchmark'], known_only=True)  # Grain workers read flags
  run(main)
