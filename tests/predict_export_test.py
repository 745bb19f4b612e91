"""Batched, bucketed prediction on mixed sizes; export round trips."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from deeplab_jax import checkpointing, export, models, predict
from deeplab_jax.data import labels as label_tables
from deeplab_jax.data import normalization
from deeplab_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {'a': (37, 53), 'b': (64, 48), 'c': (40, 50), 'd': (37, 53)}


@pytest.fixture(scope='module')
def model_and_images(tmp_path_factory):
  model = models.create(
    'deeplabv3plus_resnet_tiny', num_classes=3, rngs=nnx.Rngs(0)
  )
  meta = checkpointing.model_metadata(model, class_names=('x', 'y', 'z'))
  images = tmp_path_factory.mktemp('images')
  rng = np.random.RandomState(0)
  for name, hw in SIZES.items():
    Image.fromarray(rng.randint(0, 255, (*hw, 3), np.uint8)).save(
      images / f'{name}.png'
    )
  return model, meta, images


def _alone(model, meta, path):
  x = normalization.normalize(predict.read_image(path), **meta['normalization'])
  return np.asarray(predict.logits(model, x[None]))[0]


@pytest.mark.slow
def test_bucket_one_is_exact_and_buckets_keep_sizes(model_and_images):
  model, meta, images = model_and_images
  paths = predict.find_images(str(images))
  exact = {
    p: (lab, out)
    for p, lab, out in predict.predict_images(
      model, meta, paths, batch_size=2, bucket=1
    )
  }
  assert sorted(exact) == paths
  for p, (label_map, out) in exact.items():
    np.testing.assert_allclose(
      out, _alone(model, meta, p), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(label_map, out.argmax(-1))
  padded = list(
    predict.predict_images(model, meta, paths, batch_size=3, bucket=32)
  )
  assert sorted(p for p, _, _ in padded) == paths
  for p, label_map, out in padded:
    hw = SIZES[os.path.basename(p)[0]]
    assert label_map.shape == hw and out.shape == (*hw, 3)
  assert predict.bucket_shape((37, 53), 32) == (64, 64)
  assert predict.bucket_shape((64, 48), 32) == (64, 64)


def test_write_prediction_files_and_overlay_size(model_and_images, tmp_path):
  model, meta, images = model_and_images
  path = str(images / 'b.png')
  [(_, label_map, out)] = predict.predict_images(model, meta, [path])
  written = predict.write_prediction(
    path, str(tmp_path), label_map, meta, logits_=out
  )
  assert [os.path.basename(w) for w in written] == [
    'b_label.png',
    'b_overlay.png',
    'b_logits.npy',
  ]
  with Image.open(tmp_path / 'b_overlay.png') as im:
    assert im.mode == 'RGB'
    shown = np.asarray(im)
  # The blend over the image, then a legend: one swatch per class shown,
  # in the class's palette colour, on a white strip.
  assert shown.shape[1] == 48 and shown.shape[0] > 64
  palette = label_tables.default_palette(meta['model']['num_classes'])
  strip = shown[64:]
  present = set(np.unique(label_map).tolist())
  # Black (class 0) is also the text's colour: the other classes tell.
  for c in range(1, len(palette)):
    swatch = (strip == palette[c]).all(-1).sum()
    assert swatch >= 64 if c in present else swatch == 0, c  # 8x8 inside
  assert present - {0}
  np.testing.assert_array_equal(np.load(tmp_path / 'b_logits.npy'), out)


def test_undecodable_image_is_named(tmp_path):
  bad = tmp_path / 'broken.png'
  bad.write_bytes(b'not a png')
  with pytest.raises(UserError, match='broken.png'):
    predict.read_image(str(bad))


def test_export_round_trip_any_batch(model_and_images, tmp_path):
  model, meta, _ = model_and_images
  written = export.export_dir(model, meta, str(tmp_path), height=40, width=56)
  assert [os.path.basename(w) for w in written] == [
    'model.jax_export',
    'export.json',
  ]
  fn, meta2 = export.load_exported(str(tmp_path))
  assert meta2['class_names'] == ['x', 'y', 'z']
  assert meta2['export'] == {
    'height': 40,
    'width': 56,
    'batch': None,
    'platforms': ['cpu'],
  }
  rng = np.random.RandomState(1)
  for b in (1, 3):
    x = rng.randn(b, 40, 56, 3).astype(np.float32)
    want = np.asarray(predict.logits(model, x))
    # The symbolic-batch program may sum in another order. Bound: 1e-5 of
    # the largest logit, float32 rounding through the network (measured up
    # to 2.2e-6); a wrong batch or weight changes the logits by their own
    # scale.
    np.testing.assert_allclose(fn(x), want, atol=1e-5 * np.abs(want).max())


def test_export_script_from_a_checkpoint(model_and_images, tmp_path):
  model, meta, _ = model_and_images
  ckpt = str(tmp_path / 'ckpt')
  checkpointing.save_model(ckpt, model, meta)
  out = tmp_path / 'exported'
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'scripts.export',
      '--checkpoint',
      ckpt,
      '--size',
      '33x47',
      '--batch',
      '2',
      '--output',
      str(out),
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  fn, _ = export.load_exported(str(out))
  x = np.random.RandomState(2).randn(2, 33, 47, 3).astype(np.float32)
  np.testing.assert_allclose(
    fn(x), predict.logits(model, x), rtol=1e-5, atol=1e-5
  )
  with pytest.raises(UserError, match='scripts.export'):
    export.load_exported(str(tmp_path))


def test_inputs_with_the_same_stem_are_named_and_others_counted(tmp_path):
  for name in ('drawn.png', 'drawn.jpg', 'notes.txt', 'other.png'):
    (tmp_path / name).write_bytes(b'')
  with pytest.raises(UserError) as e:
    predict.find_inputs(str(tmp_path))
  assert str(e.value).startswith(
    f'{tmp_path / "drawn.jpg"} and {tmp_path / "drawn.png"} would both '
    'write drawn_label.png'
  )
  (tmp_path / 'drawn.jpg').unlink()
  paths, skipped = predict.find_inputs(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['drawn.png', 'other.png']
  assert skipped == [str(tmp_path / 'notes.txt')]


def _gathered_heights(compiled_text):
  """Heights of the `[B, H, W, C]` arrays a compiled program all-gathers."""
  shapes = re.findall(
    r'= \w+\[(\d+),(\d+),(\d+),(\d+)\]\S* all-gather\(', compiled_text
  )
  return [int(s[1]) for s in shapes]


@pytest.mark.slow
def test_images_split_over_devices_predict_the_same(model_and_images):
  """`spatial=4`: each image's height over 4 devices (any height, e.g. 37
  rows) gives the logits of the image alone; the compiled program never
  gathers an activation finer than output stride 8."""
  model, meta, images = model_and_images
  paths = predict.find_images(str(images))
  split = predict.predict_images(model, meta, paths, batch_size=2, spatial=4)
  for p, _, out in split:
    np.testing.assert_allclose(
      out, _alone(model, meta, p), rtol=1e-5, atol=1e-5
    )
  x = np.random.RandomState(0).randn(2, 128, 96, 3).astype(np.float32)
  for arch in ('deeplabv3plus_resnet_tiny', 'denseaspp_tiny'):
    m = models.create(arch, num_classes=3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
      predict.logits(m, x, spatial=4), predict.logits(m, x), atol=1e-5
    )
    heights = _gathered_heights(
      predict.lowered(m, x, spatial=4).compile().as_text()
    )
    # Atrous rates (ASPP 6-18 at OS16, DenseASPP 3-24 at OS8) that reach
    # past a device's few rows gather that small map; nothing finer.
    assert all(h <= 128 // 8 for h in heights), (arch, heights)
