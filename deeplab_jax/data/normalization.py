"""Input normalisation statistics: the one place they are written.

Values are in 0-255 pixel units: `x = (pixel - mean) / std`. A model is
only right on inputs normalised the way its weights were trained, so every
checkpoint records its statistics, and each PyTorch source layout names the
ones its published checkpoints used.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from deeplab_jax.errors import ConfigError

# torchvision / timm / smp / mmseg: ImageNet statistics, given there as
# mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) of 0-1 pixels.
IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))

# The official DenseASPP checkpoints: Cityscapes statistics of 0-1 pixels,
# `transforms.Normalize([0.290101, 0.328081, 0.286964], [0.182954,
# 0.186566, 0.184475])` in DeepMotionAIResearch/DenseASPP `inference.py`.
DENSEASPP_CITYSCAPES = (
  tuple(255 * v for v in (0.290101, 0.328081, 0.286964)),
  tuple(255 * v for v in (0.182954, 0.186566, 0.184475)),
)

# timm's Xception weights (`xception65.tf_in1k`, ...; the TensorFlow
# DeepLab models' Inception preprocessing): mean 0.5 and std 0.5 of 0-1
# pixels, as `timm.models.get_pretrained_cfg(...).mean / .std` give them.
INCEPTION = ((127.5,) * 3, (127.5,) * 3)

NAMED = {
  'imagenet': IMAGENET,
  'inception': INCEPTION,
  'denseaspp_cityscapes': DENSEASPP_CITYSCAPES,
}


def as_record(
  mean: Sequence[float], std: Sequence[float]
) -> dict[str, list[float]]:
  """The checkpoint metadata form, `{'mean': [...], 'std': [...]}`."""
  return {'mean': [float(v) for v in mean], 'std': [float(v) for v in std]}


def parse(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """`'imagenet'`, `'inception'`, `'denseaspp_cityscapes'` or six numbers
  `'M_R,M_G,M_B,S_R,S_G,S_B'` (0-255 units) -> `(mean, std)`."""
  if text in NAMED:
    return NAMED[text]
  try:
    values = [float(v) for v in text.split(',')]
  except ValueError:
    values = []
  if len(values) != 6 or min(values[3:]) <= 0:
    raise ConfigError(
      f'normalization {text!r}: use one of {", ".join(NAMED)} or six '
      'numbers MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B in 0-255 units '
      '(stds positive)'
    )
  return tuple(values[:3]), tuple(values[3:])


def normalize(
  image: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
  """`(image - mean) / std` in float32 (0-255 units), on the host."""
  return (image.astype(np.float32) - np.float32(mean)) / np.float32(std)


def normalize_on_device(images, mean: Sequence[float], std: Sequence[float]):
  """`normalize` for a batch inside a jitted step (uint8 in, float32 out).

  Training batches travel as uint8, a quarter of the bytes of float32
  between Grain's worker processes and to the device.
  """
  # A multiply by a host-computed reciprocal rounds the same on every shard
  # shape; XLA:CPU's vectorised division did not (1 ulp), which training on
  # different device counts then amplified.
  inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
  return (images.astype(jnp.float32) - np.float32(mean)) * inv_std
