"""Class tables and colour palettes."""

from __future__ import annotations

import numpy as np


def default_palette(num_classes: int) -> np.ndarray:
  """`[num_classes, 3]` uint8 colours, Pascal VOC's bit-interleaved scheme.

  Class 0 is black, then distinct saturated colours; the first 21 are the
  VOC colours.
  """
  palette = np.zeros((num_classes, 3), np.uint8)
  for c in range(num_classes):
    label, r, g, b = c, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((label >> 0) & 1) << shift
      g |= ((label >> 1) & 1) << shift
      b |= ((label >> 2) & 1) << shift
      label >>= 3
    palette[c] = (r, g, b)
  return palette
