"""Augmentation in NumPy/OpenCV, per example, in the input workers.

The training recipe of the DeepLab papers and mmsegmentation: random scale
(0.5-2.0, bilinear for the image, nearest for labels), random crop padded
with the image mean (zero after normalisation) and the ignore label,
horizontal flip, optional photometric jitter, then normalisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from deeplab_jax.data import normalization
from deeplab_jax.data.labels import IGNORE


def random_scale(
  image: np.ndarray,
  label: np.ndarray,
  rng: np.random.Generator,
  scale_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
  """Rescales by a factor drawn uniformly from `scale_range`."""
  s = rng.uniform(*scale_range)
  h, w = label.shape
  size = (max(1, round(w * s)), max(1, round(h * s)))  # cv2 takes (w, h)
  image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
  return image, label


def pad_to(
  image: np.ndarray,
  label: np.ndarray,
  size: tuple[int, int],
  image_fill: Sequence[float],
  ignore: int = IGNORE,
) -> tuple[np.ndarray, np.ndarray]:
  """Pads bottom/right up to at least `size` (image with `image_fill`, label
  with `ignore`)."""
  h, w = label.shape
  ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
  if ph == 0 and pw == 0:
    return image, label
  out_image = np.empty((h + ph, w + pw, image.shape[2]), image.dtype)
  out_image[...] = np.asarray(image_fill, image.dtype)
  out_image[:h, :w] = image
  out_label = np.full((h + ph, w + pw), ignore, label.dtype)
  out_label[:h, :w] = label
  return out_image, out_label


def random_crop(
  image: np.ndarray,
  label: np.ndarray,
  rng: np.random.Generator,
  size: tuple[int, int],
  image_fill: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
  """Pads to `size` if needed, then crops a random `size` window."""
  image, label = pad_to(image, label, size, image_fill)
  h, w = label.shape
  y = int(rng.integers(0, h - size[0] + 1))
  x = int(rng.integers(0, w - size[1] + 1))
  return (
    image[y : y + size[0], x : x + size[1]],
    label[y : y + size[0], x : x + size[1]],
  )


def random_flip(
  image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors image and label together with probability 1/2."""
  if rng.random() < 0.5:
    return image[:, ::-1], label[:, ::-1]
  return image, label


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Brightness (+-32), contrast and saturation (x0.5-1.5) jitter, each with
  probability 1/2 (mmsegmentation's PhotoMetricDistortion, without hue)."""
  x = image.astype(np.float32)
  if rng.random() < 0.5:
    x += rng.uniform(-32, 32)
  if rng.random() < 0.5:
    x *= rng.uniform(0.5, 1.5)
  if rng.random() < 0.5:
    gray = x.mean(axis=-1, keepdims=True)
    x = gray + (x - gray) * rng.uniform(0.5, 1.5)
  return np.clip(x, 0, 255)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """The full training transform of one decoded example.

  Input `{'image': uint8 [H, W, 3], 'label': uint8 [H, W, 1]}` with raw
  labels; output `{'image': uint8 [h, w, 3], 'label': uint8 [h, w]}` with
  train ids, `h, w = crop_size`. The image is not normalised here: uint8
  is a quarter of float32's bytes between worker processes and to the
  device, and the train step applies `normalization.normalize_on_device`
  with `mean` and `std`. Crop padding is the mean colour (zero after
  normalisation, up to rounding) and the ignore label.
  """

  lut: np.ndarray
  crop_size: tuple[int, int]
  scale_range: tuple[float, float] = (0.5, 2.0)
  flip: bool = True
  photometric: bool = False
  mean: tuple[float, ...] = normalization.IMAGENET[0]
  std: tuple[float, ...] = normalization.IMAGENET[1]

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    image = example['image']
    label = self.lut[example['label'][..., 0]]
    if self.scale_range != (1.0, 1.0):
      image, label = random_scale(image, label, rng, self.scale_range)
    fill = np.rint(self.mean).astype(np.uint8)
    image, label = random_crop(image, label, rng, self.crop_size, fill)
    if self.flip:
      image, label = random_flip(image, label, rng)
    if self.photometric:
      image = np.rint(photometric(image, rng)).astype(np.uint8)
    return {
      'image': np.ascontiguousarray(image, np.uint8),
      'label': np.ascontiguousarray(label, np.uint8),
    }


@dataclasses.dataclass(frozen=True)
class EvalPrepare:
  """Evaluation: train-id labels and normalisation at full resolution."""

  lut: np.ndarray
  mean: tuple[float, ...] = normalization.IMAGENET[0]
  std: tuple[float, ...] = normalization.IMAGENET[1]

  def __call__(self, example: dict) -> dict:
    return {
      'image': normalization.normalize(example['image'], self.mean, self.std),
      'label': self.lut[example['label'][..., 0]].astype(np.int32),
    }
