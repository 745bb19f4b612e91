"""Every recipe: documented keys, locked, and its smoke variant trains."""

import importlib
import os

import pytest

from deeplab_jax import train
from deeplab_jax.errors import ConfigError

RECIPES = [
  'synthetic_demo',
  'cityscapes_denseaspp',
  'cityscapes_deeplabv3',
  'cityscapes_deeplabv3plus',
  'ade20k_deeplabv3plus',
  'cityscapes_mobilenet',
]
KEYS = [
  'train.num_steps',
  'train.batch_size',
  'train.log_every_steps',
  'eval.every_steps',
  'checkpoint.every_steps',
  'data.dataset',
  'data.data_dir',
  'model.arch',
  'model.init_from',
  'optim.lr',
  'mesh.shape',
]


@pytest.mark.parametrize('name', RECIPES)
def test_recipe_keys_and_lock(name):
  module = importlib.import_module(f'configs.{name}')
  c = module.get_config()
  for key in KEYS:
    node = c
    for part in key.split('.'):
      node = node[part]
  assert 'python -m scripts.train' in module.__doc__
  with pytest.raises(AttributeError):
    c.train.num_stpes = 3  # typo: the config is locked
  with pytest.raises(ValueError, match='unknown variant'):
    module.get_config('nope')


def test_denseaspp_recipe_is_the_reported_one():
  from configs import cityscapes_denseaspp

  c = cityscapes_denseaspp.get_config()
  assert c.model.arch == 'denseaspp161' and c.optim.name == 'adam'
  assert (c.optim.lr, c.optim.weight_decay) == (3e-4, 1e-5)
  assert tuple(c.data.crop_size) == (512, 512) and c.train.batch_size == 8
  assert c.train.num_steps == 80 * 2975 // 8


def test_fullres_recipe_splits_whole_images_over_the_spatial_axis():
  """`:fullres` on 8 devices: a (2, 4) mesh that the batch and every
  feature map of DenseASPP-161 (output stride 8) split evenly."""
  from flax import nnx

  from configs import cityscapes_denseaspp
  from deeplab_jax import models, sharding

  c = cityscapes_denseaspp.get_config('fullres')
  assert tuple(c.data.crop_size) == (1024, 2048)
  mesh = sharding.make_mesh(c.mesh.shape)
  assert dict(mesh.shape) == {'data': 2, 'spatial': 4}
  sharding.check_batch_size(c.train.batch_size, mesh)
  model = nnx.eval_shape(
    lambda: models.create(c.model.arch, num_classes=19, rngs=nnx.Rngs(0))
  )
  sharding.check_crop(c.data.crop_size, mesh, model.config.output_stride)
  with pytest.raises(ConfigError, match='use a multiple of 32'):
    sharding.check_crop((1000, 2048), mesh, model.config.output_stride)


@pytest.mark.slow
@pytest.mark.parametrize('name', RECIPES[1:])
def test_smoke_variant_trains(name, data_dir, tmp_path):
  c = importlib.import_module(f'configs.{name}').get_config('smoke')
  c.unlock()
  c.data.data_dir = data_dir
  c.train.num_steps = 2
  c.eval.every_steps = 2
  c.lock()
  summary = train.train_and_evaluate(c, str(tmp_path / name))
  assert summary['step'] == 2
  assert os.path.isdir(tmp_path / name / 'checkpoints' / '2')
