r"""Measures training / inference speed and memory, JAX vs PyTorch, in one run.

  python -m scripts.benchmark --arch deeplabv3_resnet50 --batch 2 \
      --size 512x512 --steps 5 [--dtype bfloat16] [--torch]
  python -m scripts.benchmark --data --workers 0,1,2   # input pipeline

Prints one JSON object per measurement (`framework`, `arch`, `batch`,
`size`, `dtype`, `train_img_s`, `eval_img_s`, `peak_mem_mb`,
`gflops_per_img`, ...) and a markdown table. `--torch` needs the test extra.
"""

import json
import os
import tempfile

from absl import app, flags

from deeplab_jax.cli import entry_point

_ARCH = flags.DEFINE_list('arch', ['deeplabv3_resnet50'], 'Architectures.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Batch size.')
_SIZE = flags.DEFINE_string('size', '512x512', 'Input HxW.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (median).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], '')
_TORCH = flags.DEFINE_bool('torch', False, 'Also run the PyTorch reference.')
_LOWERING = flags.DEFINE_string('conv_lowering', 'auto', 'JAX conv lowering.')
_DATA = flags.DEFINE_bool('data', False, 'Benchmark the input pipeline.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'Grain workers.')


def _table(rows):
  keys = [
    'framework',
    'arch',
    'device',
    'batch',
    'size',
    'dtype',
    'train_img_s',
    'eval_img_s',
    'peak_mem_mb',
    'gflops_per_img',
  ]
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  for r in rows:
    cells = []
    for k in keys:
      v = r.get(k, '')
      cells.append(f'{v:.2f}' if isinstance(v, float) else str(v))
    lines.append('| ' + ' | '.join(cells) + ' |')
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
  for arch in _ARCH.value:
    kw = dict(
      batch=_BATCH.value, size=size, steps=_STEPS.value, dtype=_DTYPE.value
    )
    row = benchmarking.jax_model(arch, conv_lowering=_LOWERING.value, **kw)
    print(json.dumps(row), flush=True)
    rows.append(row)
    if _TORCH.value:
      ref = benchmarking.torch_model(arch, **kw)
      ref['jax_train_ratio'] = row['train_img_s'] / ref['train_img_s']
      ref['jax_eval_ratio'] = row['eval_img_s'] / ref['eval_img_s']
      print(json.dumps(ref), flush=True)
      rows.append(ref)
  print(_table(rows))


if __name__ == '__main__':
  # JAX and PyTorch share the GPU in one process: no preallocation.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  flags.FLAGS(['benchmark'], known_only=True)  # Grain workers read flags
  app.run(main)
