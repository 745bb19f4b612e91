"""Figures of results: the confusion matrix of an evaluation.

matplotlib renders off screen (Agg), so this works on servers without a
display.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np

matplotlib.use('Agg')

from matplotlib import pyplot as plt  # noqa: E402


def confusion_figure(
  confusion: np.ndarray, class_names: Sequence[str], path: str
) -> None:
  """Writes the row-normalised confusion matrix (rows: true class, columns:
  predicted) as a PNG with class names on both axes and a colour bar.

  Each cell is the share of the true class's pixels, in percent, written
  in the cell up to 30 classes; past that, the names alone (150 ADE20K
  classes stay legible at the figure's size).
  """
  cm = np.asarray(confusion, np.float64)
  k = len(cm)
  with np.errstate(invalid='ignore', divide='ignore'):
    share = np.nan_to_num(cm / cm.sum(1, keepdims=True))
  size = max(5.0, 0.42 * k + 2.5) if k <= 30 else 0.16 * k + 4
  font = 9 if k <= 30 else 5
  fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=110)
  image = ax.imshow(100 * share, cmap='Blues', vmin=0, vmax=100)
  bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  bar.set_label('share of the true class (%)')
  ax.set_xticks(range(k), list(class_names), rotation=90, fontsize=font)
  ax.set_yticks(range(k), list(class_names), fontsize=font)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  if k <= 30:
    for i in range(k):
      for j in range(k):
        if cm[i].sum():
          value = 100 * share[i, j]
          ax.text(
            j,
            i,
            f'{value:.0f}',
            ha='center',
            va='center',
            fontsize=font - 2,
            color='white' if value > 50 else 'black',
          )
  ax.set_title('confusion matrix (row-normalised)')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
