"""A user's own data: image files and PNG index masks in folders.

    ROOT/classes.txt               one class name per line, in id order
    ROOT/<split>/images/NAME.png   (or .jpg / .jpeg)
    ROOT/<split>/masks/NAME.png    class ids; 255 = ignore

Every directory under ROOT with an `images/` folder is a split (`train`,
`validation`, ...). Masks are matched to images by file stem.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from deeplab_jax.data.builders import base
from deeplab_jax.data.labels import LabelSpec, identity_spec

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def read_class_names(root: str) -> tuple[str, ...]:
  path = os.path.join(root, 'classes.txt')
  if not os.path.isfile(path):
    raise base.DataError(
      f'{path} is missing: an image-folder data set needs classes.txt with '
      'one class name per line (line k = class id k)'
    )
  with open(path) as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names:
    raise base.DataError(f'{path} lists no classes')
  return names


def find_pairs(root: str, split: str) -> list[tuple[str, str, str]]:
  """`(stem, image_path, mask_path)` for a split; a missing mask is named."""
  image_dir = os.path.join(root, split, 'images')
  mask_dir = os.path.join(root, split, 'masks')
  pairs = []
  for name in sorted(os.listdir(image_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:
      continue
    mask = os.path.join(mask_dir, stem + '.png')
    if not os.path.isfile(mask):
      raise base.DataError(
        f'no mask for {os.path.join(image_dir, name)}: expected {mask}'
      )
    pairs.append((stem, os.path.join(image_dir, name), mask))
  if not pairs:
    raise base.DataError(f'no images in {image_dir}')
  return pairs


class ImageFolder(base.SegmentationBuilder):
  """Images and PNG masks from a folder tree (see module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  IMAGE_FORMAT = None  # PNG and JPEG files are stored as they are

  def __init__(self, *, class_names: tuple[str, ...] = (), **kwargs):
    self._class_names = tuple(class_names)
    super().__init__(**kwargs)

  def label_spec(self) -> LabelSpec:
    return identity_spec(self._class_names or ('unknown',))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    self._class_names = read_class_names(root)
    splits = sorted(
      d
      for d in os.listdir(root)
      if os.path.isdir(os.path.join(root, d, 'images'))
    )
    if not splits:
      raise base.DataError(
        f'{root} has no <split>/images/ folders (e.g. train/images/)'
      )
    return {s: self._generate_examples(root, s) for s in splits}

  def _generate_examples(self, root: str, split: str):
    for stem, image_path, mask_path in find_pairs(root, split):
      with open(image_path, 'rb') as f:
        image = f.read()
      with open(mask_path, 'rb') as f:
        mask = f.read()
      yield self.example(
        f'{split}/{stem}',
        image,
        mask,
        image_name=image_path,
        label_name=mask_path,
      )
