"""Cityscapes (Cordts et al. 2016) fine annotations, from the official zips.

TFDS ships a `cityscapes` builder, but it needs TensorFlow to prepare
(`tf.io.gfile`); this one reads the same two manual-dir archives without it:
`leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` from
https://www.cityscapes-dataset.com/downloads/ (free registration). Labels
are kept as raw labelIds; the pipeline maps them to the 19 train ids.
Splits: train (2,975) and validation (500); the test labels are withheld.
"""

from __future__ import annotations

import os
import re
import zipfile

import tensorflow_datasets as tfds

from deeplab_jax.data.builders import base
from deeplab_jax.data.labels import cityscapes_spec

IMAGES_ZIP = 'leftImg8bit_trainvaltest.zip'
LABELS_ZIP = 'gtFine_trainvaltest.zip'
_IMAGE = re.compile(r'^leftImg8bit/(train|val)/([^/]+)/(.+)_leftImg8bit\.png$')


class CityscapesFine(base.SegmentationBuilder):
  """Cityscapes images with fine labelId maps (train / validation)."""

  VERSION = tfds.core.Version('1.0.0')
  LABEL_SPEC = cityscapes_spec()
  MANUAL_FILES = (IMAGES_ZIP, LABELS_ZIP)
  SOURCE_URL = 'https://www.cityscapes-dataset.com/downloads/'

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    return {
      'train': self._generate_examples(root, 'train'),
      'validation': self._generate_examples(root, 'val'),
    }

  def _generate_examples(self, root: str, split: str):
    with (
      zipfile.ZipFile(os.path.join(root, IMAGES_ZIP)) as images,
      zipfile.ZipFile(os.path.join(root, LABELS_ZIP)) as labels,
    ):
      label_names = set(labels.namelist())
      for name in sorted(images.namelist()):
        m = _IMAGE.match(name)
        if not m or m.group(1) != split:
          continue
        _, city, stem = m.groups()
        label = f'gtFine/{split}/{city}/{stem}_gtFine_labelIds.png'
        if label not in label_names:
          raise base.DataError(f'{LABELS_ZIP} has no {label} for {name}')
        yield self.example(
          stem,
          images.read(name),
          labels.read(label),
          image_name=f'{IMAGES_ZIP}:{name}',
          label_name=f'{LABELS_ZIP}:{label}',
        )
