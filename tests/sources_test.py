"""Published weights by name (`deeplab_jax.convert.sources`), served on
loopback: the Hub path through `huggingface_hub`'s own cache and offline
mode, the URL path through `torch.hub`'s cache and hash check, the table
against timm's and torchvision's own records, and the recipes' defaults."""

import hashlib
import importlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from flax import nnx
from timm.models.densenet import DenseNet

from configs import cityscapes_mobilenet
from deeplab_jax import checkpointing, initialization, models
from deeplab_jax.convert import sources
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.data import datasets
from deeplab_jax.errors import UserError
from tests import weights_servers
from tests.run_helpers import run_python
from tests.torch_refs import (
  dilate_densenet,
  nchw,
  nhwc,
  randomize_batchnorm,
  rel_err,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_REPO = 'timm/densenet_tiny.test_in1k'
# Every recipe that trains a real model (the demo trains a tiny one).
RECIPES = tuple(
  importlib.import_module(f'configs.{name}')
  for name in (
    'ade20k_deeplabv3plus',
    'cityscapes_deeplabv3',
    'cityscapes_deeplabv3plus',
    'cityscapes_denseaspp',
    'cityscapes_mobilenet',
    'voc_deeplabv3plus',
  )
)


def _tiny_timm_densenet():
  """timm's DenseNet at `denseaspp_tiny`'s widths, random weights."""
  torch.manual_seed(0)
  model = DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_classes=10)
  randomize_batchnorm(model, 1)
  return model.eval()


def _run(args, env_extra, timeout=600):
  env = dict(os.environ, **env_extra)
  return subprocess.run(
    [sys.executable, '-m', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )


def _one_line(stderr):
  """The error line: the only one besides download progress bars."""
  lines = [
    line
    for line in stderr.strip().splitlines()
    if not re.search(r'\d%\|', line)
  ]
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  return lines[0]


@pytest.mark.slow
def test_hub_name_through_train_equals_timm(tmp_path, data_dir):
  """A Hub cache laid out by `hf_hub_download` from a loopback Hub, then
  `scripts.train` offline with `init_from=hf-hub:...`: the run's backbone
  equals timm's model on the same weights, and the checkpoint records the
  name and the file's hash."""
  ref = _tiny_timm_densenet()
  weights = tmp_path / 'model.safetensors'
  safetensors.torch.save_file(ref.state_dict(), str(weights))
  data = weights.read_bytes()
  hf_home = tmp_path / 'hf'
  path = weights_servers.hub_path(HUB_REPO, 'model.safetensors')
  with weights_servers.serve({path: data}) as url:
    cached = huggingface_hub.hf_hub_download(
      HUB_REPO, 'model.safetensors', cache_dir=hf_home / 'hub', endpoint=url
    )
  assert os.path.basename(os.path.realpath(cached)) == (
    hashlib.sha256(data).hexdigest()
  )

  # A config file of the user's own: the smoke recipe without the
  # transition 4 that an ImageNet DenseNet lacks, so all of it is timm's.
  recipe = tmp_path / 'recipe.py'
  recipe.write_text(
    'from configs import cityscapes_denseaspp\n'
    'def get_config(arg=None):\n'
    "  c = cityscapes_denseaspp.get_config('smoke')\n"
    '  c.unlock()\n'
    '  c.model.options.transition4 = False\n'
    '  return c\n'
  )
  workdir = tmp_path / 'run'
  args = [
    'scripts.train',
    f'--config={recipe}',
    f'--workdir={workdir}',
    f'--config.data.data_dir={data_dir}',
    f'--config.model.init_from=hf-hub:{HUB_REPO}',
    # Weights and BN statistics stay as loaded: lr 0, frozen BN.
    '--config.optim.lr=0.0',
    '--config.model.freeze_bn=True',
  ]
  env = {'HF_HOME': str(hf_home), 'HF_HUB_OFFLINE': '1'}
  r = _run(args + ['--config.train.num_steps=1'], env)
  assert r.returncode == 0, r.stderr
  model, meta = checkpointing.load_model(str(workdir / 'checkpoints'))
  assert meta['init_from']['name'] == f'hf-hub:{HUB_REPO}'
  assert meta['init_from']['sha256'] == hashlib.sha256(data).hexdigest()

  # Resuming takes the weights from the checkpoint: with the weights cache
  # gone and no network, the run goes on, and its next step still records
  # where the weights came from.
  shutil.rmtree(hf_home)
  r = _run(args + ['--config.train.num_steps=2'], env)
  assert r.returncode == 0, r.stderr
  assert not hf_home.exists()
  steps = (workdir / 'checkpoints').iterdir()
  assert sorted(int(p.name) for p in steps if p.name.isdigit()) == [1, 2]
  _, meta2 = checkpointing.load_model(str(workdir / 'checkpoints'))
  assert meta2['init_from'] == meta['init_from']
  assert checkpointing.read_metadata(str(workdir)) == meta2

  x = np.random.RandomState(0).randn(2, 61, 83, 3).astype(np.float32)
  with torch.no_grad():
    want = nhwc(dilate_densenet(ref).features(nchw(x)))
  backbone = models.platform_view(
    nnx.view(model.backbone, use_running_average=True), 'cpu'
  )
  got = nnx.jit(lambda m, v: m(v))(backbone, jnp.asarray(x))['out']
  # timm's norm5 is BatchNorm + ReLU; torchvision's (and ours) BatchNorm.
  got = jnp.maximum(got, 0)
  assert got.shape == want.shape
  assert rel_err(got, want) < 1e-5


def test_offline_miss_is_one_line_and_writes_nothing(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  r = _run(
    [
      'scripts.train',
      '--config=configs/cityscapes_denseaspp.py:smoke',
      f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}',
      '--config.model.arch=denseaspp161',
      '--config.model.init_from=hf-hub:timm/densenet161.tv_in1k',
    ],
    {'HF_HOME': str(tmp_path / 'empty_hf'), 'HF_HUB_OFFLINE': '1'},
    timeout=300,
  )
  assert r.returncode == 1
  line = _one_line(r.stderr)
  for part in (
    'hf-hub:timm/densenet161.tv_in1k',
    'not in the Hugging Face cache',
    'HF_HUB_OFFLINE is set',
    'hf download timm/densenet161.tv_in1k model.safetensors',
    'local path',
  ):
    assert part in line, line
  assert not workdir.exists()


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(UserError) as e:
    sources.fetch('torchvision:deeplabv3_resnet18')
  message = str(e.value)
  assert "unknown weights name 'torchvision:deeplabv3_resnet18'" in message
  for name in sources.SOURCES:
    assert name in message


def _torch_bytes(state_dict):
  buffer = io.BytesIO()
  torch.save(state_dict, buffer)
  return buffer.getvalue()


def test_truncated_download_and_corrupt_cache_are_refused(
  tmp_path, monkeypatch
):
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
  data = _torch_bytes({'w': torch.arange(4096.0)})
  name = '/w.pth'
  # No stated hash: the Content-Length still catches the truncation.
  with weights_servers.serve({name: data}, truncate={name: 1000}) as url:
    with pytest.raises(UserError) as e:
      sources.fetch(url + name)
  message = str(e.value)
  assert '\n' not in message
  assert f'closed after 1000 of {len(data)} bytes' in message
  assert 'nothing was kept' in message
  assert not cache.exists() or not any(cache.rglob('*'))
  # A cached file that no longer matches its stated hash (a disk fault, an
  # edit): removed.
  spec = f'{url}{name}#sha256={hashlib.sha256(data).hexdigest()}'
  cached = sources.url_cache_path(url + name)
  os.makedirs(os.path.dirname(cached))
  with open(cached, 'wb') as f:
    f.write(data[:-1] + b'x')
  with pytest.raises(UserError, match='fails its hash check.*removed'):
    sources.fetch(spec)
  assert not os.path.exists(cached)


def test_corrupt_hub_blob_is_removed(tmp_path):
  data = b'not the bytes the hub sent'
  path = weights_servers.hub_path(HUB_REPO, 'model.safetensors')
  with weights_servers.serve({path: data}) as url:
    cached = huggingface_hub.hf_hub_download(
      HUB_REPO, 'model.safetensors', cache_dir=tmp_path / 'hub', endpoint=url
    )
  blob = os.path.realpath(cached)
  with open(blob, 'ab') as f:
    f.write(b'!')
  script = (
    'from deeplab_jax.convert import sources\n'
    f'sources.fetch("hf-hub:{HUB_REPO}")\n'
  )
  r = run_python(['-c', script], HF_HOME=str(tmp_path), HF_HUB_OFFLINE='1')
  assert r.returncode == 1
  assert 'fails its hash check' in r.stderr and 'removed it' in r.stderr
  assert not os.path.exists(blob) and not os.path.lexists(cached)


def test_recipes_start_from_a_known_source_of_their_arch():
  for recipe in RECIPES:
    c = recipe.get_config()
    entry = sources.SOURCES.get(c.model.init_from)
    assert entry is not None, (recipe.__name__, c.model.init_from)
    assert c.model.arch in entry.archs, recipe.__name__
    assert entry.initialises == 'backbone'
    # The recipe feeds the backbone the statistics it was trained on.
    mean, std = entry.normalization
    np.testing.assert_allclose(c.data.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(c.data.std, std, rtol=1e-6)
    assert recipe.get_config('smoke').model.init_from == ''
    # The docstring names the source it starts from.
    assert f'`{c.model.init_from}`' in recipe.__doc__, recipe.__name__


# torchvision's weights enums, named here from torchvision's documentation.
_TORCHVISION_WEIGHTS = {
  'torchvision:mobilenet_v3_large': 'MobileNet_V3_Large_Weights.IMAGENET1K_V1',
  'torchvision:deeplabv3_resnet50': (
    'DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1'
  ),
  'torchvision:deeplabv3_resnet101': (
    'DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1'
  ),
  'torchvision:deeplabv3_mobilenet_v3_large': (
    'DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1'
  ),
  'torchvision:lraspp_mobilenet_v3_large': (
    'LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1'
  ),
}


def test_table_agrees_with_timm_and_torchvision():
  """Every entry against its publisher's own record: timm's pretrained
  configs (Hub repo, licence, input statistics) and torchvision's weights
  enums (URL, classes)."""
  assert {n for n in sources.SOURCES if n.startswith('torchvision:')} == set(
    _TORCHVISION_WEIGHTS
  )
  for name, entry in sources.SOURCES.items():
    if name.startswith('hf-hub:'):
      tag = name.removeprefix('hf-hub:timm/')
      cfg = timm.models.get_pretrained_cfg(tag)
      # timm names a tagged model's repo either whole or as 'timm/' + tag.
      repo = cfg.hf_hub_id.rstrip('/')
      assert entry.location == (f'timm/{tag}' if repo == 'timm' else repo)
      assert cfg.license == entry.licence, name
      np.testing.assert_allclose(
        entry.normalization, (np.array(cfg.mean) * 255, np.array(cfg.std) * 255)
      )
    else:
      w = torchvision.models.get_weight(_TORCHVISION_WEIGHTS[name])
      assert w.url == entry.location, name
      np.testing.assert_allclose(
        entry.normalization,
        (
          np.array(w.transforms().mean) * 255,
          np.array(w.transforms().std) * 255,
        ),
      )
      if entry.initialises == 'model':
        categories = w.meta['categories']
        assert entry.num_classes == len(categories)
        ours = datasets.label_spec(entry.dataset).class_names
        assert list(ours[1:]) == categories[1:]
    for arch in entry.archs:
      assert arch in models.names(), arch


def test_readme_table_lists_every_source():
  with open(os.path.join(REPO, 'README.md')) as f:
    rows = {
      m.group(1): line
      for line in f
      if (m := re.match(r'\| `((?:hf-hub|torchvision):[^`]+)`', line))
    }
  assert set(rows) == set(sources.SOURCES)
  for name, entry in sources.SOURCES.items():
    assert entry.licence in rows[name], name
    for arch in entry.archs:
      assert arch in rows[name], (name, arch)


@pytest.mark.slow
def test_whole_model_name_for_predict_and_classes_that_differ(
  tmp_path, monkeypatch, caplog
):
  """A published whole model by name as `--checkpoint` (converted in
  memory with its VOC class names), and as `init_from` of a run with other
  classes: the classifier starts fresh and a warning says so."""
  torch.manual_seed(0)
  ref = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
    weights=None, weights_backbone=None
  ).eval()
  data = _torch_bytes(ref.state_dict())
  file = f'lraspp-{hashlib.sha256(data).hexdigest()[:8]}.pth'
  name = 'torchvision:lraspp_mobilenet_v3_large'
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  with weights_servers.serve({'/' + file: data}) as url:
    entry = sources.SOURCES[name]
    monkeypatch.setitem(
      sources.SOURCES,
      name,
      type(entry)(**{**entry.__dict__, 'location': f'{url}/{file}'}),
    )
    model, meta = sources.load_model(name)
  assert meta['class_names'][1:3] == ['aeroplane', 'bicycle']
  assert meta['init_from']['name'] == name
  x = np.random.RandomState(0).randn(1, 64, 96, 3).astype(np.float32)
  with torch.no_grad():
    want = nhwc(ref(nchw(x))['out'])
  from deeplab_jax import predict

  got = predict.logits(model, jnp.asarray(x))
  assert rel_err(got, want) < 1e-4
  with pytest.raises(UserError, match='not a published segmentation model'):
    sources.load_model('hf-hub:timm/resnet101.tv_in1k')

  # As init_from of a 4-class run (now from torch.hub's cache): everything
  # but the classifiers is the source's; they start fresh, and a warning
  # names them.
  config = cityscapes_mobilenet.get_config('smoke')
  with config.unlocked():
    config.model.init_from = name
  with caplog.at_level(logging.WARNING):
    started = initialization.create_model(config, num_classes=4)
  warned = ' '.join(r.getMessage() for r in caplog.records)
  assert 'keep their random initialisation' in warned
  assert 'head.low_classifier.kernel (1, 1, 40, 4) vs (1, 1, 40, 21)' in warned
  np.testing.assert_array_equal(
    started.backbone.features[1].block[0].conv.kernel[...],
    model.backbone.features[1].block[0].conv.kernel[...],
  )
  assert started.head.low_classifier.kernel.shape == (1, 1, 40, 4)
  assert initialization.init_record(started)['name'] == name


@pytest.mark.slow
def test_torchvision_imagenet_backbones_match_torchvision():
  """The two backbone-only layouts: torchvision's ImageNet ResNet and
  MobileNetV3 against torchvision's own dilated backbones."""
  torch.manual_seed(0)
  x = np.random.RandomState(0).randn(1, 65, 49, 3).astype(np.float32)
  resnet = torchvision.models.resnet50(
    replace_stride_with_dilation=[False, True, True]
  ).eval()
  randomize_batchnorm(resnet, 2)
  model = torch_convert.load(
    'deeplabv3_resnet50', resnet.state_dict(), num_classes=3
  )
  assert model.source_layout == 'torchvision_resnet'
  assert model.fresh_weights == ('head',)
  with torch.no_grad():
    body = torch.nn.Sequential(*list(resnet.children())[:-2])
    want = nhwc(body(nchw(x)))
  backbone = models.platform_view(
    nnx.view(model.backbone, use_running_average=True), 'cpu'
  )
  got = nnx.jit(lambda m, v: m(v))(backbone, jnp.asarray(x))['layer4']
  assert rel_err(got, want) < 1e-4

  mobilenet = torchvision.models.mobilenet_v3_large(dilated=True).eval()
  randomize_batchnorm(mobilenet, 3)
  model = torch_convert.load(
    'lraspp_mobilenet_v3_large', mobilenet.state_dict(), num_classes=3
  )
  assert model.source_layout == 'torchvision_mobilenet_v3'
  with torch.no_grad():
    want = nhwc(mobilenet.features(nchw(x)))
  backbone = models.platform_view(
    nnx.view(model.backbone, use_running_average=True), 'cpu'
  )
  got = nnx.jit(lambda m, v: m(v))(backbone, jnp.asarray(x))['high']
  assert rel_err(got, want) < 1e-4
