r"""Evaluates a checkpoint on a prepared data set split: exact mIoU.

  python -m scripts.evaluate --checkpoint W/checkpoints \
      [--config configs/cityscapes_denseaspp.py] \
      [--dataset cityscapes --split validation --data_dir DIR] \
      [--mode slide --crop 512x1024 --stride 341x682] \
      [--scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip] \
      [--output eval_out] [--cityscapes_label_ids] [--spatial 4]

`--checkpoint` may also name a published model (`torchvision:...`).
The data set defaults to the one recorded in the checkpoint (or the
config's `data.dataset`, `data.data_dir` and `data.eval_split`). Prints a
per-class table and writes `results.json`, `confusion.png`, `per_class.md`
and TensorBoard scalars to `--output`; `--cityscapes_label_ids` also writes
labelId PNGs for the official Cityscapes evaluation script.
"""

import contextlib
import json
import os

from absl import flags
from ml_collections import config_flags

from deeplab_jax.cli import (
  ModelLoadFlags,
  entry_point,
  output_dir,
  parse_hw,
  run,
  use_compilation_cache,
)
from deeplab_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Training config (data set, data_dir, eval split).'
)
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint',
  None,
  'Checkpoint dir (scripts.train / scripts.convert_torch), a training '
  'workdir, or a published whole model, e.g. torchvision:deeplabv3_resnet101.',
)
_DATASET = flags.DEFINE_string('dataset', None, 'Data set name.')
_SPLIT = flags.DEFINE_string('split', None, 'Split (default: validation).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory.')
_MODE = flags.DEFINE_enum('mode', 'whole', ['whole', 'slide'], 'Inference.')
_CROP = flags.DEFINE_string('crop', None, 'Slide window HxW, e.g. 512x1024.')
_STRIDE = flags.DEFINE_string('stride', None, 'Slide stride HxW (2/3 crop).')
_SCALES = flags.DEFINE_list('scales', ['1.0'], 'Test scales, e.g. 0.5,1,1.5.')
_FLIP = flags.DEFINE_bool('flip', False, 'Average with the mirrored image.')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images per step.')
_MAX = flags.DEFINE_integer('max_examples', None, 'Only the first N images.')
_SPATIAL = flags.DEFINE_integer('spatial', 1, 'Devices sharing an image.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory for the results.')
_LABEL_IDS = flags.DEFINE_bool(
  'cityscapes_label_ids', False, 'Write Cityscapes labelId PNGs to --output.'
)
_FORCE = flags.DEFINE_bool('force', False, 'Write into a non-empty --output.')

_LOAD = ModelLoadFlags()


@entry_point
def main(argv):
  del argv
  use_compilation_cache()  # a rerun or resume loads its compiled programs
  from deeplab_jax import evaluate, metrics

  if _CHECKPOINT.value is None:
    raise UserError('--checkpoint is required')
  if _LABEL_IDS.value and not _OUTPUT.value:
    raise UserError('--cityscapes_label_ids needs --output')
  model, meta = _LOAD.load(_CHECKPOINT.value)
  training = _CONFIG.value and _CONFIG.value.to_dict()
  dataset, split, data_dir = evaluate.data_source(
    meta,
    training or _LOAD.training_config(_CHECKPOINT.value),
    dataset=_DATASET.value,
    split=_SPLIT.value,
    data_dir=_DATA_DIR.value,
  )
  mode = evaluate.InferenceMode(
    mode=_MODE.value,
    crop=parse_hw(_CROP.value, 'crop'),
    stride=parse_hw(_STRIDE.value, 'stride'),
    scales=tuple(float(s) for s in _SCALES.value),
    flip=_FLIP.value,
  )
  outputs = (
    output_dir(_OUTPUT.value, force=_FORCE.value)
    if _OUTPUT.value
    else contextlib.nullcontext()
  )
  with outputs as out:
    writer = None
    if _LABEL_IDS.value:
      labels = os.path.join(out, 'labelIds')
      writer = evaluate.cityscapes_label_id_writer(labels)
    summary = evaluate.evaluate(
      model,
      meta,
      dataset=dataset,
      split=split,
      data_dir=data_dir,
      mode=mode,
      batch_size=_BATCH.value,
      max_examples=_MAX.value,
      spatial=_SPATIAL.value,
      on_prediction=writer,
      progress=True,
    )
    print(metrics.format_table(summary))
    print(json.dumps(evaluate.headline(summary)))
    if out:
      for path in evaluate.write_results(summary, out):
        print(path)
  where = f'results in {out}' if out else 'pass --output DIR to keep them'
  print(
    f'evaluated {summary["num_images"]} images of {dataset}/{split}; {where}'
  )


if __name__ == '__main__':
  run(main)
