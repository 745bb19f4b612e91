"""Loss and metrics against NumPy references, including the ignore label."""

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from deeplab_jax import losses, metrics
from tests.torch_refs import nchw


def _case(seed=0, k=5, shape=(2, 7, 9)):
  rng = np.random.RandomState(seed)
  logits = rng.randn(*shape, k).astype(np.float32) * 3
  labels = rng.randint(0, k, shape)
  labels[rng.rand(*shape) < 0.2] = 255
  return logits, labels


def test_cross_entropy_matches_torch_ignore_index():
  logits, labels = _case()
  ours = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  ref = F.cross_entropy(
    nchw(logits), torch.from_numpy(labels), ignore_index=255
  )
  np.testing.assert_allclose(ours, ref.item(), rtol=1e-6)


def test_cross_entropy_class_weights_match_torch():
  logits, labels = _case(1)
  w = np.array([0.5, 1.0, 2.0, 1.5, 0.1], np.float32)
  ours = losses.cross_entropy(
    jnp.asarray(logits), jnp.asarray(labels), class_weights=w
  )
  ref = F.cross_entropy(
    nchw(logits),
    torch.from_numpy(labels),
    weight=torch.from_numpy(w),
    ignore_index=255,
  )
  np.testing.assert_allclose(ours, ref.item(), rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_and_ohem_keeps_hard_pixels():
  logits, labels = _case(2)
  assert (
    float(
      losses.cross_entropy(jnp.asarray(logits), jnp.full(labels.shape, 255))
    )
    == 0.0
  )
  # OHEM with min_kept=3 and an impossible threshold keeps the 3 hardest.
  nll = np.asarray(
    losses.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  )
  valid = labels != 255
  hardest = np.sort(nll[valid])[-3:]
  ours = losses.cross_entropy(
    jnp.asarray(logits), jnp.asarray(labels), ohem_thresh=1e-9, ohem_min_kept=3
  )
  np.testing.assert_allclose(ours, hardest.mean(), rtol=1e-6)


def _numpy_confusion(pred, label, k):
  cm = np.zeros((k, k), np.int64)
  for p, t in zip(pred.ravel(), label.ravel(), strict=True):
    if t != 255 and 0 <= t < k:
      cm[t, p] += 1
  return cm


def test_confusion_and_miou_against_numpy():
  rng = np.random.RandomState(3)
  k = 6
  label = rng.randint(0, k, (3, 11, 13))
  label[rng.rand(*label.shape) < 0.15] = 255
  pred = rng.randint(0, k, label.shape)
  cm = np.asarray(
    metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), k)
  )
  ref = _numpy_confusion(pred, label, k)
  np.testing.assert_array_equal(cm, ref)
  s = metrics.summarize(cm)
  iou = [
    ref[c, c] / (ref[c].sum() + ref[:, c].sum() - ref[c, c]) for c in range(k)
  ]
  np.testing.assert_allclose(s['miou'], np.mean(iou))
  np.testing.assert_allclose(s['pixel_accuracy'], np.trace(ref) / ref.sum())
  np.testing.assert_allclose(
    s['mean_accuracy'], np.mean([ref[c, c] / ref[c].sum() for c in range(k)])
  )
  freq = ref.sum(1) / ref.sum()
  np.testing.assert_allclose(s['fwiou'], np.sum(freq * np.asarray(iou)))


def test_mask_and_absent_classes():
  label = np.array([[0, 1], [1, 255]])
  pred = np.array([[0, 1], [0, 2]])
  mask = np.array([[True, True], [False, True]])
  cm = np.asarray(
    metrics.confusion_matrix(
      jnp.asarray(pred), jnp.asarray(label), 4, jnp.asarray(mask)
    )
  )
  np.testing.assert_array_equal(cm.sum(), 2)  # masked and ignored pixels out
  s = metrics.summarize(cm, ['a', 'b', 'c', 'd'])
  assert np.isnan(s['per_class_iou']['d'])  # never seen: not in the mean
  assert s['miou'] == 1.0
  assert '| **mean** |' in metrics.format_table(s)
