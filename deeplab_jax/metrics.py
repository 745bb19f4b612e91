"""Confusion matrix on device (int32), IoU and accuracies on host."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deeplab_jax.data.labels import IGNORE


def confusion_matrix(
  predictions: jax.Array,
  labels: jax.Array,
  num_classes: int,
  mask: jax.Array | None = None,
) -> jax.Array:
  """`[K, K]` int32 counts, rows = true class, columns = predicted.

  Pixels whose label is `IGNORE` or outside `[0, K)`, or where `mask` is
  False (padding), are not counted.
  """
  k = num_classes
  valid = (labels >= 0) & (labels < k) & (labels != IGNORE)
  if mask is not None:
    valid = valid & mask
  index = jnp.where(valid, labels * k + predictions, k * k)
  counts = jnp.bincount(index.reshape(-1), length=k * k + 1)
  return counts[: k * k].reshape(k, k).astype(jnp.int32)


def sharded_confusion_matrix(
  predictions: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  num_classes: int,
  mesh: jax.sharding.Mesh,
) -> jax.Array:
  """`confusion_matrix` of `[B, H, W]` batches split over every axis of
  `mesh` (batch over the first, height over a second): counted per device
  and summed (a scatter-add over a sharded array would otherwise gather
  the whole batch first). A height the second axis does not divide is
  padded with uncounted rows. Returns the replicated `[K, K]` int32."""
  axes = tuple(mesh.axis_names)
  if len(axes) > 1:
    rows = -predictions.shape[1] % mesh.shape[axes[1]]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, rows), (0, 0)))
    predictions, labels, mask = pad(predictions), pad(labels), pad(mask)

  def local(pred, label, mask):
    cm = confusion_matrix(pred, label, num_classes, mask)
    return jax.lax.psum(cm, axes)

  spec = jax.P(*axes)
  return jax.shard_map(
    local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=jax.P()
  )(predictions, labels, mask)


def summarize(
  confusion: np.ndarray, class_names: Sequence[str] | None = None
) -> dict:
  """mIoU, per-class IoU and accuracy, pixel accuracy, mean accuracy and
  frequency-weighted IoU from a confusion matrix.

  Classes that occur neither in the labels nor in the predictions have an
  undefined (NaN) IoU and are left out of the means, as mmsegmentation does.
  """
  cm = np.asarray(confusion, np.float64)
  tp = np.diag(cm)
  gt = cm.sum(1)
  pred = cm.sum(0)
  union = gt + pred - tp
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(gt > 0, tp / gt, np.nan)
  total = cm.sum()
  freq = gt / total if total else gt
  names = list(class_names) if class_names else [str(i) for i in range(len(tp))]
  return {
    'miou': float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
    'pixel_accuracy': float(tp.sum() / total) if total else 0.0,
    'mean_accuracy': float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
    'fwiou': float(np.nansum(freq * np.nan_to_num(iou))),
    'per_class_iou': dict(zip(names, iou.tolist(), strict=True)),
    'per_class_accuracy': dict(zip(names, acc.tolist(), strict=True)),
  }


def format_table(summary: dict) -> str:
  """A per-class IoU / accuracy table in markdown."""
  lines = ['| class | IoU | Acc |', '|---|---|---|']
  for name, iou in summary['per_class_iou'].items():
    acc = summary['per_class_accuracy'][name]
    fmt = lambda v: '-' if v != v else f'{100 * v:.2f}'
    lines.append(f'| {name} | {fmt(iou)} | {fmt(acc)} |')
  lines.append(
    f'| **mean** | **{100 * summary["miou"]:.2f}** | '
    f'**{100 * summary["mean_accuracy"]:.2f}** |'
  )
  return '\n'.join(lines)
