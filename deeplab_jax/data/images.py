"""Decoding images into 8-bit RGB, the one format the models take.

Shared by the data set builders and `predict`, so a file is read the same
way for training, evaluation and inference: alpha is dropped (RGBA, LA),
grayscale and palette images are expanded to three channels, and images
with more than 8 bits per channel are refused rather than clipped (the
models were trained on 8-bit pixels; rescaling is the user's call).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from deeplab_jax.errors import UserError

# PIL modes of single-channel images with more than 8 bits per sample.
_HIGH_BIT_DEPTH_MODES = ('I', 'F', 'I;16', 'I;16B', 'I;16L', 'I;16N')


class ImageError(UserError, ValueError):
  """An image file cannot be turned into 8-bit RGB."""


def open_image(data: bytes | str, name: str) -> Image.Image:
  """Decodes `data` (bytes or a path) fully; a broken file names itself."""
  try:
    im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    im.load()
    return im
  except Exception as e:  # PIL raises many types for broken files
    raise ImageError(f'cannot decode image {name}: {e}') from e


def needs_conversion(im: Image.Image, name: str) -> bool:
  """True when `im` is not stored as 8-bit RGB (and can be converted);
  raises `ImageError` for high bit depths."""
  if im.mode in _HIGH_BIT_DEPTH_MODES:
    raise ImageError(
      f'{name} has {im.mode} pixels (more than 8 bits per channel); the '
      'models take 8-bit RGB: convert it first (e.g. 16-bit values / 257)'
    )
  return im.mode != 'RGB'


def to_rgb(im: Image.Image, name: str) -> np.ndarray:
  """`[H, W, 3]` uint8 RGB of a decoded image (alpha dropped, grayscale and
  palette expanded, high bit depths refused)."""
  if needs_conversion(im, name):
    im = im.convert('RGB')
  return np.asarray(im)


def read_rgb(path: str) -> np.ndarray:
  """`[H, W, 3]` uint8 RGB of an image file (see `to_rgb`)."""
  with open_image(path, path) as im:
    return to_rgb(im, path)


def encode(array: np.ndarray, image_format: str | None = 'png') -> bytes:
  """Encodes a uint8 `[H, W]` / `[H, W, 3]` array (`'jpeg'` at quality 95,
  anything else as PNG)."""
  buf = io.BytesIO()
  if image_format == 'jpeg':
    Image.fromarray(array).save(buf, format='JPEG', quality=95)
  else:
    Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()
