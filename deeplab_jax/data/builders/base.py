"""Shared TFDS builder logic for segmentation data sets.

Every builder yields the same features: `image` (RGB, stored in its original
encoding), `label` (raw single-channel PNG, as the data set ships it; train
ids come from a lookup table in the pipeline) and `image_id`. Examples are
checked while the data set is prepared, so a corrupt image or a label value
outside the class table names its file then, not hours into training.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from deeplab_jax.data import images
from deeplab_jax.data.labels import LabelSpec
from deeplab_jax.errors import UserError


class DataError(UserError, ValueError):
  """A data file is missing, corrupt or has labels outside the table."""


def _open(data: bytes, name: str) -> Image.Image:
  try:
    return images.open_image(data, name)
  except images.ImageError as e:
    raise DataError(str(e)) from e


def check_pair(
  image_bytes: bytes,
  label_bytes: bytes,
  *,
  image_name: str,
  label_name: str,
  spec: LabelSpec,
) -> None:
  """Decodes both files; sizes must agree and labels be in the table."""
  image = _open(image_bytes, image_name)
  label = _open(label_bytes, label_name)
  try:
    images.needs_conversion(image, image_name)
  except images.ImageError as e:
    raise DataError(str(e)) from e
  if label.mode not in ('L', 'P', 'I;16', 'I'):
    raise DataError(
      f'{label_name}: label maps must be single-channel PNGs of class ids, '
      f'got mode {label.mode}'
    )
  if image.size != label.size:
    raise DataError(
      f'{label_name} is {label.size[0]}x{label.size[1]} but {image_name} is '
      f'{image.size[0]}x{image.size[1]}'
    )
  values = np.unique(np.asarray(label))
  bad = sorted(int(v) for v in values if int(v) not in spec.valid_raw)
  if bad:
    raise DataError(
      f'{label_name} has label values {bad[:10]} outside the class table '
      f'(valid: {min(spec.valid_raw)}..{max(spec.valid_raw)} as listed)'
    )


def png_bytes(array: np.ndarray) -> bytes:
  """Encodes a uint8 `[H, W]` or `[H, W, 3]` array as PNG."""
  return images.encode(array, 'png')


class SegmentationBuilder(
  tfds.core.GeneratorBasedBuilder, skip_registration=True
):
  """Base class: features, metadata and example checking.

  Subclasses set `LABEL_SPEC` (or override `label_spec()`) and
  `IMAGE_FORMAT`, and yield `self.example(...)` from `_generate_examples`.
  """

  IMAGE_FORMAT = 'png'
  LABEL_SPEC: LabelSpec | None = None
  # Files a manual-dir builder needs, with where to get them.
  MANUAL_FILES: tuple[str, ...] = ()
  SOURCE_URL = ''
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Put the files named in the builder docstring into --manual_dir.'
  )

  def label_spec(self) -> LabelSpec:
    return self.LABEL_SPEC

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(
            shape=(None, None, 3), encoding_format=self.IMAGE_FORMAT
          ),
          'label': tfds.features.Image(
            shape=(None, None, 1), encoding_format='png'
          ),
          'image_id': tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(
        class_names=list(self.label_spec().class_names)
      ),
    )

  def example(
    self,
    image_id: str,
    image_bytes: bytes,
    label_bytes: bytes,
    *,
    image_name: str,
    label_name: str,
  ) -> tuple[str, dict]:
    """A checked `(key, features)` pair for `_generate_examples`."""
    check_pair(
      image_bytes,
      label_bytes,
      image_name=image_name,
      label_name=label_name,
      spec=self.label_spec(),
    )
    label = np.asarray(_open(label_bytes, label_name))
    if label.dtype != np.uint8:
      label = label.astype(np.uint8)  # checked: every value is in the table
    image = _open(image_bytes, image_name)
    if image.mode not in ('RGB', 'L'):  # RGBA, LA, P, CMYK: stored as RGB
      image_bytes = images.encode(
        images.to_rgb(image, image_name), self.IMAGE_FORMAT
      )
    return image_id, {
      'image': io.BytesIO(image_bytes),
      # Re-encoded: palette PNGs (VOC) must become plain index maps.
      'label': io.BytesIO(png_bytes(label)),
      'image_id': image_id,
    }
