r"""Prepares a data set once, in TFDS ArrayRecord format (with progress bars).

  python -m scripts.build_dataset --dataset synthetic_shapes
  python -m scripts.build_dataset --dataset cityscapes --manual_dir ~/cityscapes
  python -m scripts.build_dataset --dataset ade20k --manual_dir ~/ade
  python -m scripts.build_dataset --dataset image_folder --manual_dir ~/mydata \
      --data_dir ~/tfds_mydata

See the README for each data set's files and where to get them.
"""

from absl import flags

from deeplab_jax.cli import entry_point, run
from deeplab_jax.data import datasets

_DATASET = flags.DEFINE_enum(
  'dataset', None, sorted(datasets.DATASETS), 'Data set to prepare.'
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir', datasets.DEFAULT_DATA_DIR, 'Where prepared data sets live.'
)
_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir', None, 'Directory with the downloaded archives / folders.'
)


@entry_point
def main(argv):
  del argv
  b = datasets.prepare(
    _DATASET.value, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value
  )
  splits = ', '.join(f'{k}: {v.num_examples}' for k, v in b.info.splits.items())
  print(
    f'{_DATASET.value} prepared in {b.data_dir} ({splits})\n'
    f'next: python -m scripts.train --config configs/RECIPE.py --workdir '
    f'runs/NAME --config.data.dataset={_DATASET.value} '
    f'--config.data.data_dir={_DATA_DIR.value}'
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['dataset'])
  run(main)
