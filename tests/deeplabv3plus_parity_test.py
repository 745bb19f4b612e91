"""DeepLabV3+: smp whole-model and timm Xception backbone parity."""

import jax.numpy as jnp
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from flax import nnx

from deeplab_jax import models, predict
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.errors import CheckpointMismatchError
from tests.torch_refs import nchw, nhwc, randomize_batchnorm, rel_err

TOL = 1e-4
# Through this host's kernels (XLA:CPU's lowerings), as users on CPU run.
_forward_jit = nnx.jit(lambda m, x: m(x))
_forward = lambda m, x: _forward_jit(models.platform_view(m, 'cpu'), x)


def _smp(
  encoder: str, output_stride: int, classes: int = 6, seed: int = 0, **kwargs
):
  torch.manual_seed(seed)
  model = smp.DeepLabV3Plus(
    encoder,
    encoder_weights=None,
    classes=classes,
    encoder_output_stride=output_stride,
    **kwargs,
  )
  randomize_batchnorm(model, seed)
  return model.eval()


@pytest.mark.parametrize(
  'encoder,arch,output_stride,sizes',
  [
    ('resnet50', 'deeplabv3plus_resnet50', 16, [(256, 384), (320, 192)]),
    ('resnet50', 'deeplabv3plus_resnet50', 8, [(192, 128), (128, 200)]),
    ('tu-xception65', 'deeplabv3plus_xception65', 16, [(256, 384), (320, 192)]),
    ('tu-xception65', 'deeplabv3plus_xception65', 8, [(128, 192), (200, 128)]),
  ],
)
def test_smp_deeplabv3plus_parity(
  encoder, arch, output_stride, sizes, parity_report
):
  ref = _smp(encoder, output_stride)
  model = torch_convert.load(
    arch, ref.state_dict(), output_stride=output_stride
  )
  assert model.source_layout == 'smp_deeplabv3plus'
  assert model.num_classes == 6 and model.config.align_corners
  for hw in sizes:
    x = np.random.RandomState(hw[0]).randn(1, *hw, 3).astype(np.float32)
    with torch.no_grad():
      expect = nhwc(ref(nchw(x)))
    err = rel_err(predict.logits(model, x), expect)
    parity_report(
      'DeepLabV3+, segmentation_models_pytorch (eval, 6 classes)',
      model=arch,
      smp_encoder=encoder,
      output_stride=output_stride,
      input=f'{hw[0]}x{hw[1]}',
      logits=err,
    )
    assert err < TOL, hw


def test_smp_plain_aspp_converts():
  ref = _smp(
    'resnet50',
    16,
    decoder_aspp_separable=False,
    decoder_atrous_rates=(6, 12, 18),
  )
  model = torch_convert.load(
    'deeplabv3plus_resnet50', ref.state_dict(), atrous_rates=(6, 12, 18)
  )
  assert not model.config.aspp_separable
  x = np.random.RandomState(0).randn(1, 128, 160, 3).astype(np.float32)
  with torch.no_grad():
    expect = nhwc(ref(nchw(x)))
  assert rel_err(predict.logits(model, x), expect) < TOL


@pytest.mark.parametrize('hw', [(256, 384), (320, 192)])
def test_timm_xception65_features_parity(hw, parity_report):
  torch.manual_seed(0)
  ref = timm.create_model(
    'xception65', pretrained=False, features_only=True, output_stride=16
  )
  randomize_batchnorm(ref, 4)
  ref.eval()
  model = torch_convert.load(
    'deeplabv3plus_xception65', ref.state_dict(), num_classes=19
  )
  assert model.source_layout == 'timm_xception'
  assert model.fresh_weights == ('head',)
  x = np.random.RandomState(1).randn(1, *hw, 3).astype(np.float32)
  with torch.no_grad():
    feats = ref(nchw(x))
  ours = _forward(
    nnx.view(model.backbone, use_running_average=True), jnp.asarray(x)
  )
  # timm's taps: index 1 = stride-4 low-level, index 4 = final features.
  low, final = (
    rel_err(ours['layer1'], nhwc(feats[1])),
    rel_err(ours['out'], nhwc(feats[4])),
  )
  parity_report(
    'Xception backbone, timm features_only (eval, output stride 16)',
    backbone='xception65',
    input=f'{hw[0]}x{hw[1]}',
    low_level=low,
    final=final,
  )
  assert low < TOL and final < TOL


def test_timm_classification_xception71_loads_as_backbone():
  torch.manual_seed(0)
  sd = timm.create_model('xception71', pretrained=False).state_dict()
  model = torch_convert.load('deeplabv3plus_xception71', sd, num_classes=3)
  assert len(model.backbone.blocks) == 23
  np.testing.assert_array_equal(
    model.backbone.blocks[22].conv3.conv_pw.kernel[...],
    sd['blocks.22.stack.conv3.conv_pw.weight'].numpy().transpose(2, 3, 1, 0),
  )


def test_smp_encoder_mismatch_is_named():
  sd = _smp('resnet50', 16).state_dict()
  with pytest.raises(CheckpointMismatchError) as e:
    torch_convert.load('deeplabv3plus_xception65', sd)
  msg = str(e.value)
  assert 'smp_deeplabv3plus' in msg and 'deeplabv3plus_resnet50' in msg
  with pytest.raises(CheckpointMismatchError, match='looks like'):
    torch_convert.load('deeplabv3plus_resnet101', sd)


@pytest.mark.parametrize(
  'arch', ['deeplabv3plus_resnet_tiny', 'deeplabv3plus_xception_tiny']
)
@pytest.mark.parametrize('output_stride', [8, 16])
def test_deeplabv3plus_shapes(arch, output_stride):
  model = models.create(
    arch, num_classes=4, rngs=nnx.Rngs(0), output_stride=output_stride
  )
  feats = _forward(model.backbone, jnp.ones((1, 64, 96, 3)))
  high = feats.get('layer4', feats.get('out'))
  assert high.shape[1:3] == (64 // output_stride, 96 // output_stride)
  assert feats['layer1'].shape[1:3] == (16, 24)
  assert _forward(model, jnp.ones((2, 65, 97, 3)))['out'].shape == (
    2,
    65,
    97,
    4,
  )


def test_paper_defaults():
  make = models.registry.make_config
  x65 = make('deeplabv3plus_xception65')
  assert (x65.output_stride, x65.rates, x65.decoder_convs) == (
    16,
    (6, 12, 18),
    2,
  )
  assert x65.aspp_separable and x65.decoder_separable
  assert x65.separable_bn_between and x65.low_level_channels == 48
  r101 = make('deeplabv3plus_resnet101', output_stride=8)
  assert r101.rates == (12, 24, 36) and not r101.aspp_separable
