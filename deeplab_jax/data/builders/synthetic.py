"""A deterministic synthetic data set: coloured shapes on textured ground.

No download: the README's first command trains on it. Four classes
(background, disc, square, triangle); each image holds one to four shapes of
random size and position, drawn in noisy class-typical colours over a
smooth random texture, so a small model learns it in minutes.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from deeplab_jax.data.builders import base
from deeplab_jax.data.labels import identity_spec

CLASSES = ('background', 'disc', 'square', 'triangle')
_COLOURS = {1: (220, 60, 50), 2: (60, 190, 70), 3: (60, 90, 220)}


def render(index: int, seed: int, height: int, width: int):
  """Image `[H, W, 3]` uint8 and label `[H, W]` uint8 of example `index`."""
  rng = np.random.default_rng([seed, index])
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  # Smooth texture: a few random low-frequency waves plus pixel noise.
  ground = np.zeros((height, width, 3), np.float32)
  for _ in range(3):
    fy, fx = rng.uniform(0.01, 0.08, 2)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(fy * yy + fx * xx + phase)[..., None]
    ground += wave * rng.uniform(10, 40, 3)
  image = 120 + ground + rng.normal(0, 8, (height, width, 3))
  label = np.zeros((height, width), np.uint8)
  for _ in range(rng.integers(1, 5)):
    cls = int(rng.integers(1, 4))
    r = rng.uniform(0.08, 0.25) * min(height, width)
    cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
    if cls == 1:
      mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif cls == 2:
      mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    else:  # upward triangle with apex at (cy - r, cx)
      mask = (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
    colour = np.asarray(_COLOURS[cls]) + rng.normal(0, 25, 3)
    image[mask] = colour + rng.normal(0, 10, (int(mask.sum()), 3))
    label[mask] = cls
  return np.clip(image, 0, 255).astype(np.uint8), label


class SyntheticShapes(base.SegmentationBuilder):
  """Synthetic shapes: 4 classes, 320 train / 64 validation images."""

  VERSION = tfds.core.Version('1.0.0')
  LABEL_SPEC = identity_spec(CLASSES, extra_valid=())
  SEED = 2026
  SIZE = (96, 128)
  SPLITS = {'train': 320, 'validation': 64}

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      split: self._generate_examples(split, n)
      for split, n in self.SPLITS.items()
    }

  def _generate_examples(self, split: str, n: int):
    offset = 0 if split == 'train' else 10**6
    for i in range(n):
      image, label = render(offset + i, self.SEED, *self.SIZE)
      name = f'{split}_{i:05d}'
      yield self.example(
        name,
        base.png_bytes(image),
        base.png_bytes(label),
        image_name=f'{name} (image)',
        label_name=f'{name} (label)',
      )
