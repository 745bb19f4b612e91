"""MobileNet family: torchvision DeepLabV3 / LR-ASPP on MobileNetV3-Large and
the official MobileNetDenseASPP, converted and compared with PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torchvision.models import segmentation as tv_seg

from deeplab_jax import models, predict
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.convert.official_denseaspp_torch import (
  OfficialMobileNetDenseASPP,
  official_state_dict,
)
from deeplab_jax.data import normalization
from deeplab_jax.errors import CheckpointMismatchError
from deeplab_jax.models import mobilenet
from tests.torch_refs import nchw, nhwc, randomize_batchnorm, rel_err

TOL = 1e-4
# Through this host's kernels (XLA:CPU's lowerings), as users on CPU run.
_forward_jit = nnx.jit(lambda m, x: m(x))
_forward = lambda m, x: _forward_jit(models.platform_view(m, 'cpu'), x)


def _torchvision(name, num_classes, seed, **kwargs):
  torch.manual_seed(seed)
  model = getattr(tv_seg, name)(
    weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
  )
  randomize_batchnorm(model, seed)
  return model.eval()


@pytest.fixture(scope='module')
def deeplabv3_pair():
  tm = _torchvision('deeplabv3_mobilenet_v3_large', 21, 0, aux_loss=True)
  return tm, torch_convert.load('deeplabv3_mobilenet_v3_large', tm.state_dict())


@pytest.mark.parametrize('hw', [(97, 129), (64, 80)])
def test_deeplabv3_mobilenet_v3_parity_main_and_aux(
  deeplabv3_pair, hw, parity_report
):
  tm, model = deeplabv3_pair
  assert model.source_layout == 'torchvision_deeplabv3_mobilenet'
  assert model.config.aux_head and model.num_classes == 21
  x = np.random.RandomState(hw[0]).randn(2, *hw, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm(nchw(x))
  out = _forward(predict.inference_view(model), jnp.asarray(x))
  main, aux = (rel_err(out[k], nhwc(ref[k])) for k in ('out', 'aux'))
  parity_report(
    'MobileNetV3-Large, torchvision (eval)',
    model='deeplabv3_mobilenet_v3_large (aux head)',
    input=f'2x{hw[0]}x{hw[1]}',
    out=main,
    aux=aux,
  )
  assert main < TOL and aux < TOL


@pytest.mark.parametrize('hw', [(97, 129), (64, 80)])
def test_lraspp_mobilenet_v3_parity(hw, parity_report):
  tm = _torchvision('lraspp_mobilenet_v3_large', 7, 1)
  model = torch_convert.load('lraspp_mobilenet_v3_large', tm.state_dict())
  assert model.source_layout == 'torchvision_lraspp'
  assert model.num_classes == 7
  x = np.random.RandomState(hw[1]).randn(2, *hw, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm(nchw(x))['out']
  err = rel_err(predict.logits(model, x), nhwc(ref))
  parity_report(
    'MobileNetV3-Large, torchvision (eval)',
    model='lraspp_mobilenet_v3_large (7 classes)',
    input=f'2x{hw[0]}x{hw[1]}',
    out=err,
  )
  assert err < TOL


def test_lraspp_train_mode_parity_and_bn_updates(parity_report):
  """Batch statistics (backbone BN momentum 0.01, eps 1e-3) in training."""
  tm = _torchvision('lraspp_mobilenet_v3_large', 5, 2)
  model = torch_convert.load('lraspp_mobilenet_v3_large', tm.state_dict())
  tm.train()
  x = np.random.RandomState(3).randn(2, 65, 81, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm(nchw(x))['out']
  graphdef, state = nnx.split(models.platform_view(model, 'cpu'))

  @jax.jit
  def fwd(state, x):
    m = nnx.merge(graphdef, state)
    return m(x)['out'], nnx.state(m)

  out, new_state = fwd(state, jnp.asarray(x))
  updated = nnx.merge(graphdef, new_state)
  ours = updated.backbone.features[13].block[1].bn  # a depthwise BN of C4
  theirs = tm.backbone['13'].block[1][1]
  err = rel_err(out, nhwc(ref))
  parity_report(
    'MobileNetV3-Large, torchvision, training mode (batch statistics)',
    model='lraspp_mobilenet_v3_large',
    input='2x65x81',
    out=err,
    c4_bn_running_var=rel_err(ours.var[...], theirs.running_var),
  )
  assert err < TOL
  np.testing.assert_allclose(ours.mean[...], theirs.running_mean, atol=1e-5)
  np.testing.assert_allclose(ours.var[...], theirs.running_var, rtol=1e-4)


@pytest.mark.parametrize('output_stride,hw', [(8, (96, 136)), (16, (96, 128))])
def test_official_mobilenet_denseaspp_parity(output_stride, hw, parity_report):
  torch.manual_seed(output_stride)
  ref = OfficialMobileNetDenseASPP(19, output_stride=output_stride)
  randomize_batchnorm(ref, 4)
  ref.eval()
  if output_stride == 16:
    # The official x8 leaves stride-16 logits at half the input size; ours
    # resize them to the input, as every model here does.
    ref.classification[2] = torch.nn.Upsample(
      size=hw, mode='bilinear', align_corners=True
    )
  model = torch_convert.load(
    'denseaspp_mobilenet_v2',
    official_state_dict(ref),
    output_stride=output_stride,
  )
  assert model.source_layout == 'official_mobilenet_denseaspp'
  assert (model.config.d0, model.config.d1) == (128, 64)
  assert model.source_normalization == normalization.DENSEASPP_CITYSCAPES
  x = np.random.RandomState(5).randn(1, *hw, 3).astype(np.float32)
  with torch.no_grad():
    expect = nhwc(ref(nchw(x)))
  err = rel_err(predict.logits(model, x), expect)
  parity_report(
    'MobileNetDenseASPP, official layout (eval, 19 classes)',
    model='denseaspp_mobilenet_v2',
    output_stride=output_stride,
    input=f'{hw[0]}x{hw[1]}',
    logits=err,
  )
  assert err < TOL


def test_official_mobilenet_denseaspp_train_mode_parity(parity_report):
  """Training mode (batch statistics; dropout off on both sides)."""
  torch.manual_seed(6)
  ref = OfficialMobileNetDenseASPP(5)
  randomize_batchnorm(ref, 6)
  model = torch_convert.load('denseaspp_mobilenet_v2', official_state_dict(ref))
  ref.train()
  for m in ref.modules():
    if isinstance(m, torch.nn.Dropout2d):
      m.p = 0.0
  x = np.random.RandomState(6).randn(2, 64, 88, 3).astype(np.float32)
  with torch.no_grad():
    expect = nhwc(ref(nchw(x)))
  train_view = nnx.view(models.platform_view(model, 'cpu'), deterministic=True)
  err = rel_err(_forward(train_view, jnp.asarray(x))['out'], expect)
  parity_report(
    'MobileNetDenseASPP, official layout, training mode (batch statistics)',
    model='denseaspp_mobilenet_v2',
    input='2x64x88',
    logits=err,
  )
  assert err < TOL


def test_make_divisible_and_widths_follow_the_reference():
  # Hand computed: 18 rounds to 16, below 90% of 18, so one step more.
  assert mobilenet.make_divisible(18) == 24
  assert mobilenet.make_divisible(960 // 4) == 240
  assert mobilenet.make_divisible(72 // 4) == 24
  m = nnx.eval_shape(
    lambda: models.create(
      'lraspp_mobilenet_v3_large', num_classes=3, rngs=nnx.Rngs(0)
    )
  )
  assert m.backbone.channels() == {'low': 40, 'high': 960}
  n = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  tm = tv_seg.lraspp_mobilenet_v3_large(
    weights=None, weights_backbone=None, num_classes=3
  )
  assert n == sum(p.numel() for p in tm.parameters())


def test_wrong_family_is_refused_by_name():
  tm = _torchvision('lraspp_mobilenet_v3_large', 3, 0)
  with pytest.raises(CheckpointMismatchError, match='torchvision_lraspp'):
    torch_convert.load('deeplabv3_mobilenet_v3_large', tm.state_dict())
  ref = OfficialMobileNetDenseASPP(19)
  with pytest.raises(CheckpointMismatchError, match='denseaspp_mobilenet'):
    torch_convert.load('denseaspp161', official_state_dict(ref))
