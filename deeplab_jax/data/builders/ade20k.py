"""ADE20K SceneParse150 (Zhou et al. 2017) from `ADEChallengeData2016.zip`.

TFDS's `scene_parse150` downloads at prepare time; this builder reads the
archive from the manual dir (http://data.csail.mit.edu/places/ADEchallenge/
ADEChallengeData2016.zip). 150 classes, raw 0 = other (ignored).
Splits: train (20,210) and validation (2,000).
"""

from __future__ import annotations

import os
import re
import zipfile

import tensorflow_datasets as tfds

from deeplab_jax.data.builders import base
from deeplab_jax.data.labels import ade20k_spec

ARCHIVE = 'ADEChallengeData2016.zip'
_IMAGE = re.compile(
  r'^ADEChallengeData2016/images/(training|validation)/(.+)\.jpg$'
)


class Ade20k(base.SegmentationBuilder):
  """ADE20K scene parsing, 150 classes."""

  VERSION = tfds.core.Version('1.0.0')
  IMAGE_FORMAT = 'jpeg'
  LABEL_SPEC = ade20k_spec()
  MANUAL_FILES = (ARCHIVE,)
  SOURCE_URL = 'http://data.csail.mit.edu/places/ADEchallenge/'

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    return {
      'train': self._generate_examples(root, 'training'),
      'validation': self._generate_examples(root, 'validation'),
    }

  def _generate_examples(self, root: str, split: str):
    with zipfile.ZipFile(os.path.join(root, ARCHIVE)) as z:
      names = set(z.namelist())
      for name in sorted(names):
        m = _IMAGE.match(name)
        if not m or m.group(1) != split:
          continue
        label = f'ADEChallengeData2016/annotations/{split}/{m.group(2)}.png'
        if label not in names:
          raise base.DataError(f'{ARCHIVE} has no {label} for {name}')
        yield self.example(
          m.group(2),
          z.read(name),
          z.read(label),
          image_name=f'{ARCHIVE}:{name}',
          label_name=f'{ARCHIVE}:{label}',
        )
