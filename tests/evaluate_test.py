"""Exact evaluation, sliding window, multi-scale + flip, scripts.evaluate."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from deeplab_jax import checkpointing, evaluate, models, predict
from deeplab_jax.data import datasets, normalization
from deeplab_jax.data import labels as label_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('sky', 'road', 'car')
# Mixed sizes, repeated, so batches of one size fill and others pad.
SIZES = [(40, 56), (48, 64), (40, 56), (33, 47), (48, 64), (40, 56), (33, 47)]


@pytest.fixture(scope='module')
def mixed_sizes(tmp_path_factory):
  """An image-folder data set of 7 validation images in 3 sizes with
  ignore pixels, and a tiny random model checkpoint for its 3 classes."""
  root = tmp_path_factory.mktemp('folder')
  with open(root / 'classes.txt', 'w') as f:
    f.write('\n'.join(CLASSES))
  rng = np.random.RandomState(0)
  for split in ('train', 'validation'):
    os.makedirs(root / split / 'images')
    os.makedirs(root / split / 'masks')
    for i, (h, w) in enumerate(SIZES):
      img = rng.randint(0, 255, (h, w, 3)).astype(np.uint8)
      mask = rng.randint(0, 3, (h, w)).astype(np.uint8)
      mask[rng.rand(h, w) < 0.1] = 255
      Image.fromarray(img).save(root / split / 'images' / f'im{i}.png')
      Image.fromarray(mask).save(root / split / 'masks' / f'im{i}.png')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  datasets.prepare('image_folder', data_dir=data_dir, manual_dir=str(root))
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=3, rngs=nnx.Rngs(1)
  )
  ckpt = str(tmp_path_factory.mktemp('ckpt'))
  meta = checkpointing.model_metadata(
    model, class_names=CLASSES, extra={'dataset': 'image_folder'}
  )
  checkpointing.save_model(ckpt, model, meta)
  return data_dir, ckpt


def _numpy_confusion(pairs, k):
  cm = np.zeros((k, k), np.int64)
  for pred, label in pairs:
    ok = label != 255
    np.add.at(cm, (label[ok], pred[ok]), 1)
  return cm


@pytest.mark.slow
def test_exact_miou_on_mixed_sizes_any_batch_and_device_count(mixed_sizes):
  data_dir, ckpt = mixed_sizes
  model, meta = checkpointing.load_model(ckpt)
  # Independent reference: each image alone through predict.logits, counted
  # with NumPy.
  source, spec = datasets.open_split('image_folder', 'validation', data_dir)
  pairs = []
  for i in range(len(source)):
    ex = source[i]
    x = normalization.normalize(ex['image'], **meta['normalization'])[None]
    pred = np.asarray(predict.logits(model, x))[0].argmax(-1)
    pairs.append((pred, spec.lut[ex['label'][..., 0]].astype(np.int64)))
  want = _numpy_confusion(pairs, 3)
  assert want.sum() == sum((p[1] != 255).sum() for p in pairs)

  common = dict(dataset='image_folder', split='validation', data_dir=data_dir)
  one = evaluate.evaluate(
    model, meta, batch_size=1, devices=jax.devices()[:1], **common
  )
  eight = evaluate.evaluate(model, meta, batch_size=8, **common)
  three = evaluate.evaluate(
    model, meta, batch_size=3, devices=jax.devices()[:3], **common
  )
  for got in (one, eight, three):
    np.testing.assert_array_equal(np.asarray(got['confusion']), want)
    assert got['num_images'] == len(SIZES)
  tp = np.diag(want)
  iou = tp / (want.sum(0) + want.sum(1) - tp)
  np.testing.assert_allclose(one['miou'], iou.mean(), rtol=1e-12)
  np.testing.assert_allclose(
    one['pixel_accuracy'], tp.sum() / want.sum(), rtol=1e-12
  )


@pytest.mark.slow
def test_images_split_over_devices_evaluate_the_same(mixed_sizes):
  """`spatial=4` (a (2, 4) mesh; heights 33-48 rows, uneven splits) counts
  the confusion matrix of the data-parallel run, whole and slide +
  multi-scale + flip alike."""
  data_dir, ckpt = mixed_sizes
  model, meta = checkpointing.load_model(ckpt)
  common = dict(dataset='image_folder', split='validation', data_dir=data_dir)
  slide = evaluate.InferenceMode(
    mode='slide', crop=(32, 40), scales=(0.75, 1.0), flip=True
  )
  for mode in (evaluate.InferenceMode(), slide):
    got = [
      evaluate.evaluate(model, meta, batch_size=2, mode=mode, **common, **kw)
      for kw in ({'devices': jax.devices()[:2]}, {'spatial': 4})
    ]
    np.testing.assert_array_equal(got[1]['confusion'], got[0]['confusion'])


def test_window_starts_hand_computed():
  assert evaluate.window_starts(10, 4, 3) == [0, 3, 6]
  assert evaluate.window_starts(11, 4, 3) == [0, 3, 6, 7]
  assert evaluate.window_starts(4, 4, 3) == [0]
  assert evaluate.window_starts(3, 4, 3) == [0]  # image smaller than crop


def test_slide_averages_overlapping_windows_like_a_loop():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 11, 13, 3), jnp.float32)
  # A window-dependent function: subtract each window's own mean.
  apply = lambda w: w - w.mean(axis=(1, 2), keepdims=True)
  got = np.asarray(evaluate.slide_logits(apply, x, (4, 5), (3, 4)))
  xs = np.asarray(x)
  total = np.zeros_like(xs)
  count = np.zeros((11, 13, 1))
  for y in (0, 3, 6, 7):
    for x0 in (0, 4, 8):
      win = xs[:, y : y + 4, x0 : x0 + 5]
      total[:, y : y + 4, x0 : x0 + 5] += win - win.mean((1, 2), keepdims=True)
      count[y : y + 4, x0 : x0 + 5] += 1
  np.testing.assert_allclose(got, total / count, atol=1e-6)


@pytest.fixture(scope='module')
def tiny():
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=3, rngs=nnx.Rngs(0)
  )
  model = predict.inference_view(model)
  return jax.jit(lambda x: model(x)['out'])


def test_slide_with_crop_equal_to_image_is_whole(tiny):
  x = jnp.asarray(np.random.RandomState(1).randn(1, 37, 53, 3), jnp.float32)
  mode = evaluate.InferenceMode(mode='slide', crop=(37, 53))
  np.testing.assert_allclose(
    evaluate.scores(tiny, x, mode), tiny(x), rtol=0, atol=0
  )


def test_flip_average_of_a_symmetric_input_is_symmetric(tiny):
  half = np.random.RandomState(2).randn(1, 33, 24, 3)
  x = jnp.asarray(np.concatenate([half, half[:, :, ::-1]], 2), jnp.float32)
  plain = np.asarray(jax.nn.softmax(tiny(x), -1))
  assert np.abs(plain - plain[:, :, ::-1]).max() > 1e-3  # model isn't
  s = np.asarray(evaluate.scores(tiny, x, evaluate.InferenceMode(flip=True)))
  np.testing.assert_allclose(s, s[:, :, ::-1], atol=1e-6)


def test_multi_scale_with_one_scale_is_single_scale(tiny):
  x = jnp.asarray(np.random.RandomState(3).randn(2, 29, 41, 3), jnp.float32)
  one = evaluate.InferenceMode(scales=(1.0,))
  np.testing.assert_array_equal(evaluate.scores(tiny, x, one), tiny(x))
  # The averaging path with the same pass twice is the softmax of one pass.
  twice = evaluate.InferenceMode(scales=(1.0, 1.0))
  np.testing.assert_allclose(
    evaluate.scores(tiny, x, twice), jax.nn.softmax(tiny(x), -1), atol=1e-6
  )
  # A second scale changes the scores but keeps the input size.
  two = evaluate.scores(tiny, x, evaluate.InferenceMode(scales=(0.5, 1.0)))
  assert two.shape == (2, 29, 41, 3)


def test_multi_scale_flip_is_the_mean_softmax_of_every_pass(tiny):
  """Against a reference built from PyTorch's bilinear resize and NumPy:
  each (scale, flip) pass resized back, softmaxed, averaged."""
  import torch
  import torch.nn.functional as F

  x = np.random.RandomState(4).randn(2, 29, 41, 3).astype(np.float32)

  def resize(a, hw):  # NHWC numpy -> NHWC numpy, F.interpolate semantics
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    t = F.interpolate(t, size=hw, mode='bilinear', align_corners=False)
    return t.numpy().transpose(0, 2, 3, 1)

  def softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  # Scaled sizes round half up, hand-computed: 29 * 0.75 = 21.75 -> 22,
  # 41 * 0.75 = 30.75 -> 31, 29 * 1.25 = 36.25 -> 36, 41 * 1.25 = 51.25 -> 51.
  passes = []
  for hw in ((22, 31), (36, 51)):
    xs = resize(x, hw)
    plain = np.asarray(tiny(jnp.asarray(xs)))
    flipped = np.asarray(tiny(jnp.asarray(xs[:, :, ::-1].copy())))[:, :, ::-1]
    for out in (plain, flipped):
      passes.append(softmax(resize(np.ascontiguousarray(out), (29, 41))))
  expect = np.mean(passes, axis=0)
  mode = evaluate.InferenceMode(scales=(0.75, 1.25), flip=True)
  got = np.asarray(evaluate.scores(tiny, jnp.asarray(x), mode))
  np.testing.assert_allclose(got, expect, atol=2e-6)
  assert np.abs(passes[0] - passes[3]).max() > 1e-3  # the passes differ


def test_cityscapes_label_id_writer(tmp_path):
  write = evaluate.cityscapes_label_id_writer(str(tmp_path))
  pred = np.array([[0, 1, 18], [13, 10, 2]], np.int32)
  write('frankfurt_000000_000294', pred)
  got = np.asarray(
    Image.open(tmp_path / 'frankfurt_000000_000294_labelIds.png')
  )
  # Cityscapes: road 7, sidewalk 8, bicycle 33, car 26, sky 23, building 11.
  np.testing.assert_array_equal(got, [[7, 8, 33], [26, 23, 11]])
  assert len(label_tables.cityscapes_spec().class_names) == 19


@pytest.mark.slow
def test_evaluate_script_slide_multiscale_flip(mixed_sizes, tmp_path):
  data_dir, ckpt = mixed_sizes
  out = tmp_path / 'eval'
  cmd = [
    sys.executable,
    '-m',
    'scripts.evaluate',
    '--checkpoint',
    ckpt,
    '--data_dir',
    data_dir,
    '--mode',
    'slide',
    '--crop',
    '32x40',
    '--scales',
    '0.75,1.0',
    '--flip',
    '--batch_size',
    '2',
    '--spatial',
    '2',  # each image over both devices
    '--output',
    str(out),
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='2')
  r = subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert '| **mean** |' in r.stdout
  results = json.loads((out / 'results.json').read_text())
  assert results['num_images'] == len(SIZES)
  assert results['mode']['flip'] and results['mode']['mode'] == 'slide'
  assert sum(map(sum, results['confusion'])) > 0
  assert list(results['per_class_iou']) == list(CLASSES)
  with Image.open(out / 'confusion.png') as png:  # a labelled figure
    assert min(png.size) >= 500
  assert os.listdir(out / 'tensorboard')
  # A second run refuses to overwrite the results.
  r = subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert r.returncode == 1 and 'pass --force' in r.stderr


def test_failed_evaluate_leaves_output_as_it_found_it(mixed_sizes, tmp_path):
  data_dir, ckpt = mixed_sizes
  out = tmp_path / 'eval'
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'scripts.evaluate',
      '--checkpoint',
      ckpt,
      '--dataset',
      'ade20k',
      '--data_dir',
      data_dir,
      '--output',
      str(out),
      '--cityscapes_label_ids',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith('error: ')
  assert not out.exists()
