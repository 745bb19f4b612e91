"""Converted checkpoints round-trip; the scripts work and fail in one line."""

import os
import shutil
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from torchvision.models.segmentation import deeplabv3_resnet50

from deeplab_jax import checkpointing, models, predict
from deeplab_jax.checkpointing import digests
from deeplab_jax.convert.official_denseaspp_torch import (
  OfficialMobileNetDenseASPP,
  official_state_dict,
)
from deeplab_jax.data.builders import synthetic
from deeplab_jax.errors import (
  CheckpointCorruptError,
  CheckpointMismatchError,
  CheckpointNotFoundError,
)
from tests.torch_refs import nchw, nhwc, randomize_batchnorm, rel_err

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT_FILES = ('label.png', 'logits.npy', 'overlay.png')


def _run(*args, cwd=REPO, **env_vars):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **env_vars)
  return subprocess.run(
    [sys.executable, '-m', *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_save_and_load_model_round_trip(tmp_path):
  model = models.create(
    'deeplabv3_resnet_tiny',
    num_classes=4,
    rngs=nnx.Rngs(1),
    output_stride=16,
    aux_head=True,
  )
  meta = checkpointing.model_metadata(model, class_names=list('abcd'))
  checkpointing.save_model(tmp_path / 'ckpt', model, meta)
  loaded, meta2 = checkpointing.load_model(tmp_path / 'ckpt')
  assert meta2['class_names'] == list('abcd')
  assert loaded.config == model.config and loaded.arch == model.arch
  x = np.random.RandomState(0).randn(1, 40, 56, 3).astype(np.float32)
  np.testing.assert_array_equal(
    predict.logits(loaded, x), predict.logits(model, x)
  )


def test_converted_checkpoints_are_verified_on_load(tmp_path):
  """save_model writes digests; one flipped bit in the stored weights is
  refused by load_model, and by scripts.predict in one line."""
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=2, rngs=nnx.Rngs(0)
  )
  ckpt = tmp_path / 'ckpt'
  checkpointing.save_model(ckpt, model, checkpointing.model_metadata(model))
  assert (ckpt / '0' / 'digests').is_dir()
  checkpointing.load_model(ckpt)  # verifies
  data = max((ckpt / '0' / 'model').rglob('d/*'), key=os.path.getsize)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 1
  data.write_bytes(bytes(raw))
  with pytest.raises(CheckpointCorruptError, match='does not match its'):
    checkpointing.load_model(ckpt)
  image = tmp_path / 'x.png'
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  r = _run(
    'scripts.predict',
    '--checkpoint',
    str(ckpt),
    '--input',
    str(image),
    '--output',
    str(tmp_path / 'out'),
  )
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  [line] = r.stderr.strip().splitlines()
  assert line.startswith(f'error: {ckpt}/0: item model, array [')


def test_host_digests_equal_device_digests():
  """Single-process saves digest in NumPy, multi-host ones on the devices:
  both must give the same numbers for every dtype and sharding, or a
  checkpoint written by one would be refused by the other."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  rng = np.random.RandomState(0)
  mesh = jax.make_mesh((8,), ('data',))
  tree = {
    'f32': rng.randn(16, 3).astype(np.float32),
    'bf16': jnp.asarray(rng.randn(5, 7), jnp.bfloat16),
    'i32': np.arange(-7, 6, dtype=np.int32),
    'u8': rng.randint(0, 256, (4, 4)).astype(np.uint8),
    'bool': rng.rand(9) > 0.5,
    'scalar': np.float32(-0.0),
    'i64': np.arange(5, dtype=np.int64),  # int32 on the device (no x64)
    'sharded': jax.device_put(
      rng.randn(16, 4).astype(np.float32),
      NamedSharding(mesh, PartitionSpec('data')),
    ),
  }
  host = [digests._host_leaf_digest(v) for v in jax.tree.leaves(tree)]
  device = jax.device_get(digests._tree_digests(tree))
  assert host == [(int(a), int(b)) for a, b in jax.tree.leaves(device)]
  # By hand: bits 0x3F800000 (1.0) and 0x40000000 (2.0). d1: weights 1 and
  # 3. d2: each word mixed as b ^ b >> 15 ^ b << 7 (0xFF807F00,
  # 0x40008000), weights i * 0x9E3779B1 + 0x7F4A7C15, made odd (0x7F4A7C15,
  # 0x1D81F5C7); all modulo 2**32.
  d1, d2 = digests._host_leaf_digest(np.float32([1, 2]))
  assert d1 == (0x3F800000 + 3 * 0x40000000) % 2**32
  assert d2 == (0xFF807F00 * 0x7F4A7C15 + 0x40008000 * 0x1D81F5C7) % 2**32


def test_remote_paths_pass_through_untouched(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert checkpointing.resolve_path('gs://bucket/run') == 'gs://bucket/run'
  assert checkpointing.resolve_path('s3://b/r/') == 's3://b/r/'
  assert checkpointing.resolve_path('run') == str(tmp_path / 'run')
  home = os.path.expanduser('~')
  assert checkpointing.resolve_path('~/r') == os.path.join(home, 'r')


def test_checkpoint_errors(tmp_path):
  with pytest.raises(CheckpointNotFoundError, match='does not exist'):
    checkpointing.load_model(tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointNotFoundError, match='no checkpoint steps'):
    checkpointing.load_model(tmp_path / 'empty')
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=2, rngs=nnx.Rngs(0)
  )
  with pytest.raises(CheckpointMismatchError, match='3 class names'):
    checkpointing.model_metadata(model, class_names=['a', 'b', 'c'])


@pytest.mark.slow
def test_convert_torch_script_then_predict_script(tmp_path, parity_report):
  torch.manual_seed(0)
  tm = deeplabv3_resnet50(
    weights=None, weights_backbone=None, num_classes=3, aux_loss=True
  )
  randomize_batchnorm(tm, 0)
  tm.eval()
  pth = tmp_path / 'model.pth'
  torch.save(tm.state_dict(), pth)
  out = tmp_path / 'ckpt'
  r = _run(
    'scripts.convert_torch',
    '--arch',
    'deeplabv3_resnet50',
    '--input',
    str(pth),
    '--output',
    str(out),
    '--class_names',
    'road,car,sky',
  )
  assert r.returncode == 0, r.stderr
  assert 'torchvision_deeplabv3' in r.stdout

  # The checkpoint alone rebuilds the model; logits equal PyTorch's.
  model, meta = checkpointing.load_model(out)
  assert meta['model']['arch'] == 'deeplabv3_resnet50'
  assert meta['class_names'] == ['road', 'car', 'sky']
  assert meta['source']['layout'] == 'torchvision_deeplabv3'
  x = np.random.RandomState(1).randn(1, 65, 49, 3).astype(np.float32)
  with torch.no_grad():
    ref = nhwc(tm(nchw(x))['out'])
  assert rel_err(predict.logits(model, x), ref) < 1e-4

  # scripts.predict with default flags: each image's saved logits equal
  # the PyTorch model's on that image, normalised independently here with
  # torchvision's ImageNet statistics (0-1 pixel units). Odd sizes, an RGBA
  # PNG (alpha dropped) and a grayscale PNG (expanded to RGB).
  images = tmp_path / 'images'
  images.mkdir()
  rng = np.random.RandomState(2)
  pixels = {
    'a': rng.randint(0, 255, (203, 311, 3), np.uint8),
    'b': rng.randint(0, 255, (64, 48, 4), np.uint8),
    'c': rng.randint(0, 255, (37, 53), np.uint8),
  }
  for name, array in pixels.items():
    Image.fromarray(array).save(images / f'{name}.png')
  (images / 'notes.txt').write_text('not an image')
  pred = tmp_path / 'pred'
  r = _run(
    'scripts.predict',
    '--checkpoint',
    str(out),
    '--input',
    str(images),
    '--output',
    str(pred),
    '--save_logits',
  )
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(pred)) == [
    f'{n}_{kind}' for n in 'abc' for kind in PREDICT_FILES
  ]
  mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
  refs = {}
  for name, array in pixels.items():
    rgb = (
      array[..., :3] if array.ndim == 3 else np.repeat(array[..., None], 3, -1)
    )
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std
    with torch.no_grad():
      ref = nhwc(tm(x[None])['out'])[0]
    saved = np.load(pred / f'{name}_logits.npy')
    assert saved.shape == ref.shape
    assert rel_err(saved, ref) < 1e-5, name
    with Image.open(pred / f'{name}_label.png') as im:
      assert im.mode == 'P' and im.size == rgb.shape[1::-1]
      np.testing.assert_array_equal(np.asarray(im), saved.argmax(-1))
    with Image.open(pred / f'{name}_overlay.png') as im:
      # The image, then a legend strip of whole 14-pixel rows.
      width, height = im.size
      assert width == rgb.shape[1] and (height - rgb.shape[0]) % 14 == 0
      assert height > rgb.shape[0]
    refs[name] = ref

  # The opt-in speed option changes the numbers (how much, for the docs).
  [(_, padded_labels, padded)] = predict.predict_images(
    model, meta, [str(images / 'a.png')], batch_size=1, bucket=32
  )
  deviation = rel_err(padded, refs['a'])
  parity_report(
    'scripts.predict --bucket 32 (opt-in) against PyTorch on the image alone',
    model='deeplabv3_resnet50, random weights',
    input='203x311 -> padded 224x320',
    logits=deviation,
    labels_changed=f'{(padded_labels != refs["a"].argmax(-1)).mean():.1%}',
  )
  assert deviation > 1e-3

  # Refusals are one line, with exit status 1 and no traceback.
  r = _run(
    'scripts.convert_torch',
    '--arch',
    'deeplabv3_resnet101',
    '--input',
    str(pth),
    '--output',
    str(tmp_path / 'x'),
  )
  assert r.returncode == 1
  assert r.stderr.strip().startswith('error: torchvision_deeplabv3 state dict')
  assert 'Traceback' not in r.stderr
  r = _run(
    'scripts.predict',
    '--checkpoint',
    str(out),
    '--input',
    str(images),
    '--output',
    str(pred),
  )
  assert r.returncode == 1 and 'not empty' in r.stderr


def test_official_mobilenet_denseaspp_through_the_scripts(tmp_path):
  """An official MobileNetDenseASPP `.pth` -> `scripts.convert_torch` ->
  `scripts.predict --spatial 2` (each image over 2 devices): the saved
  logits equal the PyTorch model's on the image normalised as the official
  `inference.py` does (0-1 pixels, its Cityscapes mean and std)."""
  torch.manual_seed(3)
  tm = OfficialMobileNetDenseASPP(4)
  randomize_batchnorm(tm, 3)
  tm.eval()
  pth = tmp_path / 'mobilenet_denseaspp.pth'
  torch.save({'state_dict': official_state_dict(tm)}, pth)
  out = tmp_path / 'ckpt'
  r = _run(
    'scripts.convert_torch',
    '--arch',
    'denseaspp_mobilenet_v2',
    '--input',
    str(pth),
    '--output',
    str(out),
  )
  assert r.returncode == 0, r.stderr
  assert 'official_mobilenet_denseaspp' in r.stdout
  images = tmp_path / 'images'
  images.mkdir()
  rgb = np.random.RandomState(4).randint(0, 255, (72, 104, 3), np.uint8)
  Image.fromarray(rgb).save(images / 'street.png')
  pred = tmp_path / 'pred'
  r = _run(
    'scripts.predict',
    '--checkpoint',
    str(out),
    '--input',
    str(images),
    '--output',
    str(pred),
    '--save_logits',
    '--spatial',
    '2',
    JAX_NUM_CPU_DEVICES='2',
  )
  assert r.returncode == 0, r.stderr
  mean = torch.tensor([0.290101, 0.328081, 0.286964])[:, None, None]
  std = torch.tensor([0.182954, 0.186566, 0.184475])[:, None, None]
  x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std
  with torch.no_grad():
    ref = nhwc(tm(x[None]))[0]
  assert rel_err(np.load(pred / 'street_logits.npy'), ref) < 1e-4


def test_predict_demo_runs_and_fills_the_default_compilation_cache(tmp_path):
  env = {k: v for k, v in os.environ.items() if 'CACHE_DIR' not in k}
  with mock.patch.dict(os.environ, env, clear=True):
    r = _run(
      'scripts.predict',
      '--demo',
      '--output',
      str(tmp_path / 'demo'),
      XDG_CACHE_HOME=str(tmp_path / 'cache'),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',  # tiny programs too
    )
  assert r.returncode == 0, r.stderr
  written = sorted(os.listdir(tmp_path / 'demo'))
  assert written == [
    'demo_inputs',
    'demo_model',
    'image_label.png',
    'image_overlay.png',
  ]
  # README passes demo_inputs to --input: a folder of images only.
  assert os.listdir(tmp_path / 'demo' / 'demo_inputs') == ['image.png']
  assert 'skipped' not in r.stdout
  # The demo input is drawn as the demo recipe's training images are (an
  # index no split uses), so the trained demo model meets familiar data.
  with Image.open(tmp_path / 'demo' / 'demo_inputs' / 'image.png') as im:
    shown = np.asarray(im)
  drawn, _ = synthetic.render(
    2 * 10**6, synthetic.SyntheticShapes.SEED, *synthetic.SyntheticShapes.SIZE
  )
  np.testing.assert_array_equal(shown, drawn)
  # On by default, in the documented place: a rerun loads, not compiles.
  assert os.listdir(tmp_path / 'cache' / 'deeplab_jax' / 'jax')
  # A folder with an undecodable file: the good image is predicted and
  # kept, the broken one named, and the command exits non-zero.
  folder = tmp_path / 'mixed'
  folder.mkdir()
  shutil.copy(tmp_path / 'demo' / 'demo_inputs' / 'image.png', folder)
  (folder / 'broken.png').write_bytes(b'\x89PNG not really')
  ckpt = tmp_path / 'demo' / 'demo_model'
  args = ['--checkpoint', str(ckpt), '--input', str(folder)]
  r = _run('scripts.predict', *args, '--output', str(tmp_path / 'mixed_out'))
  assert r.returncode == 1, r.stderr
  lines = r.stderr.strip().splitlines()
  assert lines[-2].startswith(f'failed: cannot decode image {folder}')
  assert 'broken.png' in lines[-2]
  assert lines[-1] == (
    'error: 1 of 2 files could not be read (listed above); the others were '
    'predicted'
  )
  written = sorted(os.listdir(tmp_path / 'mixed_out'))
  assert written == ['image_label.png', 'image_overlay.png']
