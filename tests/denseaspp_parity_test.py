"""DenseASPP: official-layout and torchvision DenseNet conversion parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torchvision.models import DenseNet, densenet121, densenet161

from deeplab_jax import models, predict
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.convert.official_denseaspp_torch import (
  OfficialDenseASPP,
  official_state_dict,
)
from deeplab_jax.data import normalization
from deeplab_jax.errors import CheckpointMismatchError
from tests.torch_refs import (
  dilate_densenet,
  nchw,
  nhwc,
  randomize_batchnorm,
  rel_err,
)

TOL = 1e-4
# Through this host's kernels (XLA:CPU's lowerings), as users on CPU run.
_forward_jit = nnx.jit(lambda m, x: m(x))
_forward = lambda m, x: _forward_jit(models.platform_view(m, 'cpu'), x)


@pytest.mark.parametrize(
  'ctor,arch,hw',
  [
    (densenet121, 'denseaspp121', (97, 131)),
    (densenet161, 'denseaspp161', (67, 45)),
  ],
)
def test_torchvision_densenet_backbone_parity(ctor, arch, hw, parity_report):
  torch.manual_seed(0)
  tm = dilate_densenet(ctor(weights=None))
  randomize_batchnorm(tm, 1)
  tm.eval()
  model = torch_convert.load(
    arch, tm.state_dict(), num_classes=19, transition4=False
  )
  assert model.source_layout == 'torchvision_densenet'
  assert model.fresh_weights == ('head',)
  x = np.random.RandomState(0).randn(1, *hw, 3).astype(np.float32)
  with torch.no_grad():
    ref = nhwc(tm.features(nchw(x)))
  backbone = nnx.view(model.backbone, use_running_average=True)
  ours = _forward(backbone, jnp.asarray(x))['out']
  assert ours.shape == ref.shape
  err = rel_err(ours, ref)
  parity_report(
    'DenseNet backbone, torchvision, dilated as DenseASPP OS8 (eval)',
    backbone=arch.replace('denseaspp', 'densenet'),
    input=f'{hw[0]}x{hw[1]}',
    features=err,
  )
  assert err < TOL


@pytest.mark.slow
def test_torchvision_densenet_training_mode_matches_torch():
  # Training mode: each dense layer normalises the concatenation with batch
  # statistics that our DenseNet computes once per feature map and shares
  # (torchvision recomputes them per layer). Outputs, updated running
  # statistics and every gradient against autograd, on a growth-8 DenseNet
  # whose block 2 spans two scan chunks (6 + 1 layers, SCAN_CHUNK = 6).
  blocks = (2, 7, 2, 2)
  torch.manual_seed(0)
  tm = DenseNet(8, blocks, 16)
  tm = dilate_densenet(tm)
  randomize_batchnorm(tm, 3)
  tm.train()
  model = torch_convert.load(
    'denseaspp_tiny',
    tm.state_dict(),
    num_classes=19,
    transition4=False,
    blocks=blocks,
  )
  rng = np.random.RandomState(1)
  x = rng.randn(2, 64, 48, 3).astype(np.float32)
  tx = nchw(x).requires_grad_(True)
  ref = tm.features(tx)
  g = rng.randn(*ref.shape).astype(np.float32)
  (ref * torch.from_numpy(g)).sum().backward()
  # The CPU view: its dense layers are scans with a written-out backward.
  backbone = models.platform_view(model.backbone, 'cpu')
  graph, params, rest = nnx.split(backbone, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def loss(params, x):
    backbone = nnx.merge(graph, params, rest)
    out = backbone(x)['out']
    stats = nnx.to_pure_dict(nnx.state(backbone, nnx.BatchStat))
    return jnp.sum(out * nhwc(torch.from_numpy(g))), (out, stats)

  (_, (out, stats)), (dparams, dx) = jax.value_and_grad(
    loss, argnums=(0, 1), has_aux=True
  )(params, jnp.asarray(x))
  assert rel_err(out, nhwc(ref.detach())) < TOL
  assert rel_err(dx, nhwc(tx.grad)) < TOL
  f = tm.features
  for ours, theirs in [
    (stats['denseblock3'][1]['norm1'], f.denseblock3.denselayer2.norm1),
    (stats['transition2']['norm'], f.transition2.norm),
    (stats['norm5'], f.norm5),
  ]:
    assert rel_err(ours['mean'], theirs.running_mean.numpy()) < TOL
    assert rel_err(ours['var'], theirs.running_var.numpy()) < TOL
  # Every gradient (convolutions, and BatchNorm scales and biases, norm1's
  # included, whose scanned form pads them to the chunk's widest input),
  # mapped to our names by the converter, each against its own size with a
  # floor of 1e-3 of the largest for gradients that cancel to ~0. Bound:
  # TOL; 1e-3 for BatchNorm scales, whose gradient sums every pixel's term
  # with much cancellation (the stem's, over the largest map, rounds to
  # 2.5e-4 of itself). A wrong padded channel or chunk is off by ~1.
  grads = {
    k: (p.grad if p.grad is not None else p).detach()
    for k, p in tm.named_parameters()
  }
  grads |= {k: v for k, v in tm.state_dict().items() if k not in grads}
  want_model = torch_convert.load(
    'denseaspp_tiny', grads, num_classes=19, transition4=False, blocks=blocks
  )
  want = nnx.to_pure_dict(nnx.state(want_model.backbone, nnx.Param))
  largest = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  errors = jax.tree_util.tree_leaves_with_path(
    jax.tree.map(
      lambda o, w: (
        float(np.abs(o - w).max()) / max(float(np.abs(w).max()), 1e-3 * largest)
      ),
      dparams,
      want,
    )
  )
  assert len(errors) == len(list(tm.features.parameters()))
  over = {
    jax.tree_util.keystr(k): e
    for k, e in errors
    if e >= (1e-3 if jax.tree_util.keystr(k).endswith("['scale']") else TOL)
  }
  assert not over, over


def test_torchvision_densenet_with_transition4_starts_it_fresh():
  torch.manual_seed(0)
  sd = densenet121(weights=None).state_dict()
  model = torch_convert.load('denseaspp121', sd, num_classes=5)
  assert model.config.transition4
  assert set(model.fresh_weights) == {
    'head',
    'backbone.transition4',
    'backbone.norm5',
  }
  np.testing.assert_array_equal(
    model.backbone.denseblock4[15].conv2.kernel[...],
    sd['features.denseblock4.denselayer16.conv2.weight']
    .numpy()
    .transpose(2, 3, 1, 0),
  )
  with pytest.raises(CheckpointMismatchError, match='pass num_classes'):
    torch_convert.load('denseaspp121', sd)


# The official configs, DeepMotionAIResearch/DenseASPP cfgs/DenseASPP*.py
# (growth_rate, num_init_features, block_config, d_feature0, d_feature1),
# copied here by hand so the registry is checked against them.
OFFICIAL = {
  'denseaspp121': (32, 64, (6, 12, 24, 16), 128, 64),
  'denseaspp161': (48, 96, (6, 12, 36, 24), 512, 128),
  'denseaspp169': (32, 64, (6, 12, 32, 32), 336, 168),
  'denseaspp201': (32, 64, (6, 12, 48, 32), 480, 240),
}
_official_cache = {}


def _official(arch):
  """A random official-layout reference and its conversion (the converter
  is given only the state dict: widths and classes come from the keys)."""
  if arch not in _official_cache:
    torch.manual_seed(0)
    ref = OfficialDenseASPP(*OFFICIAL[arch], n_class=19)
    randomize_batchnorm(ref, 2)
    _official_cache[arch] = (
      ref.eval(),
      torch_convert.load(arch, official_state_dict(ref)),
    )
  return _official_cache[arch]


@pytest.fixture(scope='module')
def official_121():
  yield _official('denseaspp121')
  _official_cache.clear()


@pytest.mark.slow
@pytest.mark.parametrize(
  'arch,hw',
  [
    ('denseaspp121', (256, 384)),
    ('denseaspp161', (136, 200)),
    ('denseaspp169', (136, 200)),
    ('denseaspp201', (120, 168)),
  ],
)
def test_official_denseaspp_parity(arch, hw, parity_report):
  ref, model = _official(arch)
  assert model.source_layout == 'official_denseaspp'
  assert model.config.align_corners and model.num_classes == 19
  assert (model.config.d0, model.config.d1) == OFFICIAL[arch][3:]
  assert model.source_normalization == normalization.DENSEASPP_CITYSCAPES
  x = np.random.RandomState(hw[0]).randn(1, *hw, 3).astype(np.float32)
  with torch.no_grad():
    expect = nhwc(ref(nchw(x)))
  err = rel_err(predict.logits(model, x), expect)
  parity_report(
    'DenseASPP, official layout (eval, 19 classes)',
    model=arch,
    output_stride=8,
    input=f'{hw[0]}x{hw[1]}',
    logits=err,
  )
  assert err < TOL
  if arch != 'denseaspp121':
    del _official_cache[arch]  # 161-201: large; each used once


@pytest.mark.slow
def test_official_denseaspp_training_mode_matches_torch():
  # The whole official-layout model in training mode (batch statistics,
  # the head's BatchNorm momentum, the first block's in-place ReLU) with
  # dropout off on both sides: logits and gradients against autograd.
  torch.manual_seed(2)
  ref = OfficialDenseASPP(8, 16, (2, 2, 2, 2), 16, 8, n_class=5)
  randomize_batchnorm(ref, 4)
  ref.train()
  for m in ref.modules():
    if isinstance(m, torch.nn.Dropout2d):
      m.eval()
  model = torch_convert.load('denseaspp_tiny', official_state_dict(ref))
  # The CPU view: its dense layers are scans with a written-out backward.
  model = nnx.view(models.platform_view(model, 'cpu'), deterministic=True)
  rng = np.random.RandomState(3)
  x = rng.randn(2, 64, 48, 3).astype(np.float32)
  tx = nchw(x).requires_grad_(True)
  before_head_mean = ref.ASPP_6.norm1.running_mean.clone().numpy()
  expect = ref(tx)
  g = rng.randn(*expect.shape).astype(np.float32)
  (expect * torch.from_numpy(g)).sum().backward()
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def loss(params, x):
    m = nnx.merge(graph, params, rest)
    out = m(x)['out']
    stats = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
    return jnp.sum(out * nhwc(torch.from_numpy(g))), (out, stats)

  (_, (out, stats)), (dparams, dx) = jax.value_and_grad(
    loss, argnums=(0, 1), has_aux=True
  )(params, jnp.asarray(x))
  assert rel_err(out, nhwc(expect.detach())) < TOL
  assert rel_err(dx, nhwc(tx.grad)) < TOL
  # Running statistics after the step: the head's BatchNorms move by
  # PyTorch momentum 0.0003 (models/DenseASPP.py), the backbone's by 0.1.
  # The randomised statistics are far from the batch's, so a wrong
  # momentum moves them visibly.
  head_bn = stats['head']['blocks'][1]['norm1']
  for ours, theirs in [
    (head_bn, ref.ASPP_6.norm1),
    (stats['head']['blocks'][0]['norm2'], ref.ASPP_3.norm2),
    (stats['backbone']['norm0'], ref.features.norm0),
  ]:
    for key, buf in (('mean', 'running_mean'), ('var', 'running_var')):
      want = getattr(theirs, buf).numpy()
      np.testing.assert_allclose(ours[key], want, rtol=1e-5, atol=1e-6)
  moved = np.abs(head_bn['mean'] - before_head_mean).max()
  assert 1e-6 < moved < 1e-2  # 0.0003 x a batch mean far from the stats
  for ours, theirs in [
    (dparams['head']['blocks'][2]['conv2']['kernel'], ref.ASPP_12.conv2),
    (dparams['head']['blocks'][0]['conv1']['kernel'], ref.ASPP_3.conv1),
    (
      dparams['backbone']['denseblock2'][1]['conv2']['kernel'],
      ref.features.denseblock2.denselayer2.conv2,
    ),
  ]:
    want = theirs.weight.grad.numpy().transpose(2, 3, 1, 0)
    assert rel_err(ours, want) < TOL


def test_official_denseaspp161_parity_output_stride_16(parity_report):
  torch.manual_seed(1)
  ref = OfficialDenseASPP(
    *OFFICIAL['denseaspp161'], n_class=7, output_stride=16
  )
  randomize_batchnorm(ref, 3)
  ref.eval()
  model = torch_convert.load(
    'denseaspp161', official_state_dict(ref), output_stride=16
  )
  x = np.random.RandomState(0).randn(1, 128, 192, 3).astype(np.float32)
  with torch.no_grad():
    expect = nhwc(ref(nchw(x)))
  err = rel_err(predict.logits(model, x), expect)
  parity_report(
    'DenseASPP, official layout (eval, 19 classes)',
    model='denseaspp161 (7 classes)',
    output_stride=16,
    input='128x192',
    logits=err,
  )
  assert err < TOL


def test_first_block_relu_reaches_the_concatenation(official_121):
  """The official in-place ReLU trap: on an input whose features have
  negatives for the in-place ReLU to remove, our logits still equal the
  official model's."""
  ref, model = official_121
  x = np.random.RandomState(5).randn(1, 64, 64, 3).astype(np.float32)
  with torch.no_grad():
    feats = ref.features(nchw(x))
    expect = nhwc(ref(nchw(x)))
  assert (feats < 0).any()  # norm5 output has negatives that ReLU removes
  assert rel_err(predict.logits(model, x), expect) < TOL


def test_module_prefix_is_stripped_and_mismatch_named(official_121):
  ref, _ = official_121
  sd = {f'module.{k}': v for k, v in official_state_dict(ref).items()}
  assert torch_convert.load('denseaspp121', sd).num_classes == 19
  torch.manual_seed(0)
  tv121 = densenet121(weights=None).state_dict()
  with pytest.raises(CheckpointMismatchError) as e:
    torch_convert.load('denseaspp161', tv121, num_classes=19)
  msg = str(e.value)
  assert 'looks like denseaspp121' in msg
  assert 'features.conv0.weight (64, 3, 7, 7) vs backbone.conv0.kernel' in msg


def test_deeplabv3_checkpoint_refused_as_denseaspp():
  torch.manual_seed(0)
  from torchvision.models.segmentation import deeplabv3_resnet50

  sd = deeplabv3_resnet50(
    weights=None, weights_backbone=None, num_classes=3
  ).state_dict()
  with pytest.raises(CheckpointMismatchError, match='cannot be loaded as'):
    torch_convert.load('denseaspp121', sd)


@pytest.mark.parametrize('output_stride', [8, 16])
def test_denseaspp_shapes_and_channels(output_stride):
  model = models.create(
    'denseaspp_tiny',
    num_classes=4,
    rngs=nnx.Rngs(0),
    output_stride=output_stride,
  )
  out = _forward(model, jnp.ones((2, 64, 80, 3)))
  assert out['out'].shape == (2, 64, 80, 4)
  # 16 + 2*8 = 32 -> 16, +16 = 32 -> 16, ... transition 4 halves to 16.
  assert model.backbone.out_channels == 16
  feats = _forward(model.backbone, jnp.ones((1, 64, 80, 3)))
  assert feats['out'].shape[1:3] == (64 // output_stride, 80 // output_stride)
  assert feats['layer1'].shape[1:3] == (16, 20)


def test_denseaspp_arch_table():
  for arch, (growth, stem, blocks, d0, d1) in OFFICIAL.items():
    config = models.registry.make_config(arch)
    assert (config.growth_rate, config.init_features, config.blocks) == (
      growth,
      stem,
      blocks,
    )
    assert (config.d0, config.d1) == (d0, d1)
    # models/DenseASPP.py: rates 3/6/12/18/24, bn momentum 0.0003 in the
    # head (PyTorch's convention; Flax's is 1 - that).
    assert config.atrous_rates == (3, 6, 12, 18, 24)
    assert config.head_bn_momentum == pytest.approx(1 - 0.0003)
