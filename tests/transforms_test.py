"""Augmentations against hand-computed cases."""

import numpy as np

from deeplab_jax.data import normalization, transforms
from deeplab_jax.data.labels import IGNORE


def test_pad_to_fills_image_with_mean_and_label_with_ignore():
  image = np.full((2, 3, 3), 7, np.uint8)
  label = np.ones((2, 3), np.uint8)
  img, lab = transforms.pad_to(image, label, (4, 4), (1, 2, 3))
  assert img.shape == (4, 4, 3) and lab.shape == (4, 4)
  np.testing.assert_array_equal(img[:2, :3], 7)
  np.testing.assert_array_equal(img[3, 3], [1, 2, 3])
  np.testing.assert_array_equal(lab[:2, :3], 1)
  assert (lab[2:] == IGNORE).all() and (lab[:, 3] == IGNORE).all()


def test_random_crop_keeps_image_and_label_aligned():
  h, w = 20, 30
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = np.arange(w)[None]
  image[..., 1] = np.arange(h)[:, None]
  label = (np.arange(h)[:, None] * 31 + np.arange(w)[None]) % 251
  label = label.astype(np.uint8)
  rng = np.random.default_rng(0)
  for _ in range(5):
    img, lab = transforms.random_crop(image, label, rng, (8, 9), (0, 0, 0))
    y0, x0 = int(img[0, 0, 1]), int(img[0, 0, 0])
    np.testing.assert_array_equal(lab, label[y0 : y0 + 8, x0 : x0 + 9])


def test_flip_mirrors_both():
  image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  label = np.array([[1, 2], [3, 4]], np.uint8)

  class Always:
    def random(self):
      return 0.0

  img, lab = transforms.random_flip(image, label, Always())
  np.testing.assert_array_equal(lab, [[2, 1], [4, 3]])
  np.testing.assert_array_equal(img[0, 0], image[0, 1])


def test_scale_uses_nearest_for_labels():
  label = np.zeros((10, 10), np.uint8)
  label[:, 5:] = 7
  image = np.zeros((10, 10, 3), np.uint8)
  rng = np.random.default_rng(0)
  img, lab = transforms.random_scale(image, label, rng, (1.7, 1.7))
  assert lab.shape == (17, 17) and img.shape == (17, 17, 3)
  assert set(np.unique(lab)) == {0, 7}  # no interpolated label values


def test_train_augment_maps_labels_and_normalises():
  lut = np.full(256, IGNORE, np.uint8)
  lut[7] = 0
  lut[8] = 1
  aug = transforms.TrainAugment(
    lut=lut,
    crop_size=(6, 6),
    scale_range=(1.0, 1.0),
    flip=False,
    mean=(10, 10, 10),
    std=(2, 2, 2),
  )
  ex = {
    'image': np.full((6, 6, 3), 14, np.uint8),
    'label': np.array([7, 8, 9] * 12, np.uint8).reshape(6, 6, 1),
  }
  out = aug(ex, np.random.default_rng(0))
  # uint8 out; the step normalises: (14 - 10) / 2 = 2.
  assert out['image'].dtype == np.uint8 and out['label'].dtype == np.uint8
  np.testing.assert_array_equal(out['image'], 14)
  normalised = normalization.normalize_on_device(
    out['image'], aug.mean, aug.std
  )
  np.testing.assert_array_equal(np.asarray(normalised), 2.0)
  assert set(np.unique(out['label'])) == {0, 1, IGNORE}


def test_train_augment_pads_with_the_rounded_mean_and_stays_uint8():
  kw = dict(
    lut=np.arange(256, dtype=np.uint8),
    crop_size=(5, 5),
    scale_range=(1.0, 1.0),
    flip=False,
    mean=(123.675, 116.28, 103.53),
  )
  image = np.random.default_rng(0).integers(0, 256, (3, 3, 3), np.uint8)
  ex = {'image': image, 'label': np.ones((3, 3, 1), np.uint8)}
  out = transforms.TrainAugment(**kw)(ex, np.random.default_rng(1))
  label = out['label']
  assert (label == IGNORE).sum() == 25 - 9  # 2 rows + 2 columns of padding
  np.testing.assert_array_equal(
    out['image'][label == IGNORE][0], [124, 116, 104]
  )
  np.testing.assert_array_equal(
    out['image'][label == 1].reshape(3, 3, 3), image
  )
  jittered = transforms.TrainAugment(photometric=True, **kw)
  for seed in range(4):
    out = jittered(ex, np.random.default_rng(seed))
    assert out['image'].dtype == np.uint8 and out['image'].shape == (5, 5, 3)
