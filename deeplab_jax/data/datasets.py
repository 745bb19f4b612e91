"""Data set names -> TFDS builders; preparing and opening prepared splits."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import tensorflow_datasets as tfds

from deeplab_jax.data import labels
from deeplab_jax.data.builders import (
  ade20k,
  cityscapes,
  image_folder,
  synthetic,
  voc,
)
from deeplab_jax.errors import UserError

DEFAULT_DATA_DIR = os.path.join('~', 'tensorflow_datasets')


class DatasetNotFoundError(UserError, FileNotFoundError):
  """A data set that was never prepared, or manual files that are missing."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A data set we can build: its builder and where its files come from."""

  builder: Callable[..., tfds.core.GeneratorBasedBuilder]
  needs_manual_dir: bool
  train_split: str = 'train'
  eval_split: str = 'validation'


DATASETS = {
  'synthetic_shapes': DatasetSpec(synthetic.SyntheticShapes, False),
  'cityscapes': DatasetSpec(cityscapes.CityscapesFine, True),
  'ade20k': DatasetSpec(ade20k.Ade20k, True),
  'image_folder': DatasetSpec(image_folder.ImageFolder, True),
  'voc_aug': DatasetSpec(voc.VocAug, True),
}


def spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise UserError(
      f'unknown dataset {name!r}; known: {", ".join(sorted(DATASETS))}'
    )
  return DATASETS[name]


def _data_dir(data_dir: str | None) -> str:
  return os.path.expanduser(data_dir or DEFAULT_DATA_DIR)


def builder(name: str, data_dir: str | None = None):
  """The TFDS builder of `name` under `data_dir` (not necessarily prepared)."""
  return spec(name).builder(data_dir=_data_dir(data_dir))


def prepare(
  name: str, *, data_dir: str | None = None, manual_dir: str | None = None
) -> tfds.core.GeneratorBasedBuilder:
  """Prepares `name` in ArrayRecord format (TFDS shows progress bars).

  Raises:
    DatasetNotFoundError: a manual-dir data set without its files; the
      message lists the expected file names and where to get them.
  """
  s = spec(name)
  kwargs = {}
  if name == 'image_folder' and manual_dir:
    kwargs['class_names'] = image_folder.read_class_names(manual_dir)
  b = s.builder(
    data_dir=_data_dir(data_dir), file_format='array_record', **kwargs
  )
  download_config = None
  if s.needs_manual_dir:
    if not manual_dir:
      raise DatasetNotFoundError(
        f'{name} is built from files you download: pass {_manual_dir_hint(b)}'
      )
    missing = [
      f
      for f in b.MANUAL_FILES
      if not os.path.isfile(os.path.join(manual_dir, f))
    ]
    if missing or not os.path.isdir(manual_dir):
      raise DatasetNotFoundError(
        f'{name}: {", ".join(missing) or manual_dir} not found in '
        f'{manual_dir}; download {", ".join(b.MANUAL_FILES)} from '
        f'{b.SOURCE_URL} and put them there'
      )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  b.download_and_prepare(download_config=download_config)
  return b


def _manual_dir_hint(b) -> str:
  """`--manual_dir DIR (DIR holding <files> from <url>)` for builder `b`."""
  files = ', '.join(b.MANUAL_FILES) or 'the data'
  source = f' from {b.SOURCE_URL}' if b.SOURCE_URL else ''
  return f'--manual_dir DIR (DIR holding {files}{source})'


def open_split(name: str, split: str, data_dir: str | None = None):
  """`(random-access source, label spec)` of a prepared split."""
  b = builder(name, data_dir)
  if not b.is_prepared():
    # A new user also needs to know what the manual dir must hold.
    where = f' {_manual_dir_hint(b)}' if spec(name).needs_manual_dir else ''
    raise DatasetNotFoundError(
      f'data set {name} is not prepared in {_data_dir(data_dir)}; run: '
      f'python -m scripts.build_dataset --dataset {name} --data_dir '
      f'{_data_dir(data_dir)}{where}'
    )
  if split not in b.info.splits:
    raise UserError(
      f'{name} has no split {split!r}; it has {", ".join(b.info.splits)}'
    )
  return b.as_data_source(split=split), label_spec(name, b)


def label_spec(name: str, b=None) -> labels.LabelSpec:
  """Class table of a data set (image folders: from the prepared metadata)."""
  if name == 'image_folder':
    b = b or builder(name)
    names = tuple(b.info.metadata['class_names'])
    return labels.identity_spec(names)
  return spec(name).builder.LABEL_SPEC
