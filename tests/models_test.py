"""Model construction: output strides, multi-grid, shapes, registry errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from deeplab_jax import losses, models
from deeplab_jax.errors import ConfigError
from deeplab_jax.models import resnet

# Eager op-by-op execution compiles every op; one jit is much faster.
_forward = nnx.jit(lambda model, x: model(x))


@pytest.mark.parametrize(
  'output_stride,expected',
  [(8, (4, 8, 8, 8)), (16, (4, 8, 16, 16)), (32, (4, 8, 16, 32))],
)
def test_resnet_output_strides(output_stride, expected):
  net = resnet.ResNet(
    resnet.ResNetConfig(
      blocks=(1, 1, 2, 2), width=4, output_stride=output_stride
    ),
    rngs=nnx.Rngs(0),
  )
  feats = _forward(net, jnp.zeros((1, 64, 96, 3)))
  for name, stride in zip(
    ('layer1', 'layer2', 'layer3', 'layer4'), expected, strict=True
  ):
    assert feats[name].shape[1:3] == (64 // stride, 96 // stride), name
  assert feats['layer4'].shape[-1] == 4 * 8 * 4


@pytest.mark.parametrize(
  'output_stride,multi_grid,layer3,layer4',
  [
    # torchvision: a dilated stage's first block keeps the old dilation.
    (8, None, [1, 2, 2], [2, 4, 4]),
    (16, None, [1, 1, 1], [1, 2, 2]),
    (16, (1, 2, 4), [1, 1, 1], [2, 4, 8]),  # DeepLabV3 paper, sec. 3.2
    (8, (1, 2, 1), [1, 2, 2], [4, 8, 4]),
  ],
)
def test_dilations_and_multi_grid(output_stride, multi_grid, layer3, layer4):
  net = nnx.eval_shape(
    lambda: resnet.ResNet(
      resnet.ResNetConfig(
        blocks=(1, 1, 3, 3),
        width=4,
        output_stride=output_stride,
        multi_grid=multi_grid,
      ),
      rngs=nnx.Rngs(0),
    )
  )
  assert [b.conv2.dilation for b in net.layer3] == layer3
  assert [b.conv2.dilation for b in net.layer4] == layer4


def test_multi_grid_length_checked():
  with pytest.raises(ValueError, match='one rate per block'):
    resnet.ResNet(
      resnet.ResNetConfig(blocks=(1, 1, 1, 3), width=4, multi_grid=(1, 2)),
      rngs=nnx.Rngs(0),
    )


def test_tiny_deeplabv3_shapes_dtypes_and_aux():
  model = models.create(
    'deeplabv3_resnet_tiny',
    num_classes=7,
    rngs=nnx.Rngs(0),
    aux_head=True,
    output_stride=16,
  )
  out = _forward(model, jnp.ones((2, 65, 97, 3)))
  assert set(out) == {'out', 'aux'}
  for v in out.values():
    assert v.shape == (2, 65, 97, 7) and v.dtype == jnp.float32
  assert model.head.aspp.branches[1].conv.dilation == 6  # OS16 default rates


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=3, rngs=nnx.Rngs(0), dtype='bfloat16'
  )
  out = _forward(model, jnp.ones((1, 33, 33, 3)))['out']
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  assert model.backbone.conv1.kernel[...].dtype == jnp.float32


def test_registry_names_and_errors():
  assert {
    'deeplabv3_resnet50',
    'deeplabv3_resnet101',
    'deeplabv3_resnet152',
  } <= set(models.names())
  with pytest.raises(ConfigError, match="Did you mean 'deeplabv3_resnet50'"):
    models.create('deeplabv3_resnet5', num_classes=2, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='no option.*outputstride'):
    models.create(
      'deeplabv3_resnet_tiny', num_classes=2, rngs=nnx.Rngs(0), outputstride=8
    )
  with pytest.raises(ConfigError, match='positive'):
    models.create('deeplabv3_resnet_tiny', num_classes=0, rngs=nnx.Rngs(0))


def test_lowering_view_switches_every_conv():
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=3, rngs=nnx.Rngs(0)
  )
  x = jnp.asarray(np.random.RandomState(0).randn(1, 41, 37, 3), jnp.float32)
  outs = {}
  for lowering in ('native', 'im2col', 'taps', 'winograd'):
    view = nnx.view(
      model,
      conv_lowering=lowering,
      use_running_average=True,
      deterministic=True,
    )
    outs[lowering] = np.asarray(_forward(view, x)['out'])
  scale = np.abs(outs['native']).max()
  for lowering in ('im2col', 'taps', 'winograd'):
    assert np.abs(outs[lowering] - outs['native']).max() / scale < 1e-5


def test_gradients_under_jit_reach_every_parameter():
  """A jitted value_and_grad through the whole model (max-pool, BN updates,
  resize) works and every parameter gets a non-zero gradient."""
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=3, rngs=nnx.Rngs(0), aux_head=True
  )
  model = nnx.view(model, deterministic=True)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 33, 41, 3), jnp.float32)

  @nnx.jit
  def grads(m):
    def loss(m):
      out = m(x)
      return jnp.mean(out['out'] ** 2) + jnp.mean(out['aux'] ** 2)

    return nnx.grad(loss)(m)

  g = grads(model)
  leaves = jax.tree.leaves(nnx.to_pure_dict(g))
  assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert all(np.abs(np.asarray(v)).max() > 0 for v in leaves)


@pytest.mark.parametrize(
  'arch',
  [
    'deeplabv3_resnet_tiny',
    'deeplabv3plus_resnet_tiny',
    'deeplabv3plus_xception_tiny',
    'denseaspp_tiny',
  ],
)
def test_fresh_model_starts_near_chance_loss(arch):
  """Each family initialised as its reference is (models/initializers.py)
  starts within 1.25x of ln K in training mode on random inputs, as the
  PyTorch references do; a fan-out rule on the classifiers gave 2-6x."""
  k = 19
  model = nnx.view(
    models.create(arch, num_classes=k, rngs=nnx.Rngs(0)), deterministic=True
  )
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  labels = jax.random.randint(jax.random.key(2), (2, 64, 64), 0, k)
  logits = nnx.jit(lambda m, x: m(x)['out'])(model, x)
  ce = float(losses.cross_entropy(logits, labels))
  assert np.log(k) <= ce * 1.02 and ce < 1.25 * np.log(k), ce


_CPU = {'platform': 'cpu'}


@pytest.mark.slow
@pytest.mark.parametrize(
  'arch,blocks,frozen_bn,loop_view,scan_view',
  [
    ('deeplabv3_resnet_tiny', (2, 3, 2, 3), False, {}, {'scan_blocks': True}),
    # DenseNet scans by default on XLA:CPU. Dense block 2 has 7 layers: a
    # full chunk (SCAN_CHUNK = 6) and one of a single layer, as the other
    # blocks; growth 8 from 16 channels.
    ('denseaspp_tiny', (1, 7, 1, 1), False, {'platform': 'tpu'}, _CPU),
    ('denseaspp_tiny', (1, 7, 1, 1), True, {}, _CPU),
    # `model.scan_blocks` scans them on another platform.
    (
      'denseaspp_tiny',
      (1, 7, 1, 1),
      False,
      {'platform': 'gpu'},
      {'platform': 'gpu', 'scan_blocks': True},
    ),
  ],
)
def test_scanned_blocks_equal_the_loop(
  arch, blocks, frozen_bn, loop_view, scan_view
):
  """Runs of identical blocks as one scan (ResNet, `scan_blocks`), and
  dense layers as chunks of one scan over weights padded to the chunk's
  widest input with a written-out backward pass (DenseNet, by default),
  give the unrolled loop's loss, gradients and BatchNorm updates, in
  training and with frozen BatchNorm, and the program has the loop."""
  model = models.create(arch, num_classes=3, rngs=nnx.Rngs(0), blocks=blocks)
  # Running statistics unlike the initial 0 / 1, so that frozen BatchNorm
  # and the padded channels' statistics are exercised.
  rng = np.random.RandomState(1)
  for _, stat in nnx.iter_graph(model):
    if isinstance(stat, nnx.BatchStat):
      stat[...] = jnp.asarray(rng.uniform(0.5, 1.5, stat.shape), jnp.float32)
  model = nnx.view(model, deterministic=True, use_running_average=frozen_bn)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 48, 40, 3), jnp.float32)

  def step_of(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def step(params, rest):
      def loss(params):
        m = nnx.merge(graphdef, params, rest)
        out = m(x)['out']
        return jnp.mean(out**2), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

      return jax.value_and_grad(loss, has_aux=True)(params)

    return jax.jit(step), (params, rest)

  loop_step, args = step_of(nnx.view(model, **loop_view))
  (loop_loss, loop_stats), loop_grads = loop_step(*args)
  scan_step, args = step_of(nnx.view(model, **scan_view))
  (loss, stats), grads = scan_step(*args)
  assert 'while' in scan_step.lower(*args).as_text()
  assert 'while' not in loop_step.lower(*args).as_text()
  np.testing.assert_allclose(loss, loop_loss, rtol=1e-5)
  # Each leaf (gradient, statistic) against its own size: the scan sums
  # each map's gradient in another order. Bound: 1e-3 of the leaf's
  # largest value, with a floor of 1e-3 of its tree's largest value for
  # leaves that cancel to ~0 (a bias before BatchNorm, whose gradient is
  # rounding only). A BatchNorm scale's gradient sums every pixel's term
  # with much cancellation: its rounding reached 2.9e-4 (the stem's, in
  # training). A wrong padded channel or chunk is off by the leaf's size.
  for got, want in ((grads, loop_grads), (stats, loop_stats)):
    tree_scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
    errors = jax.tree.map(
      lambda g, w, t=tree_scale: (
        float(np.max(np.abs(g - w))) / max(float(np.max(np.abs(w))), 1e-3 * t)
      ),
      got,
      want,
    )
    worst = max(jax.tree.leaves(errors))
    assert worst < 1e-3, {
      jax.tree_util.keystr(k): e
      for k, e in jax.tree_util.tree_leaves_with_path(errors)
      if e >= 1e-3
    }


@pytest.mark.parametrize('platform', ['cpu', 'tpu', 'gpu'])
def test_scanned_dense_layers_use_the_fusion_barrier_only_on_cpu(platform):
  """The scanned dense layers run on any platform; XLA:CPU's fusion barrier
  goes into CPU programs only."""
  model = models.create('denseaspp_tiny', num_classes=3, rngs=nnx.Rngs(0))
  view = nnx.view(
    models.platform_view(model, platform),
    scan_blocks=True,
    deterministic=True,
  )
  graphdef, params, rest = nnx.split(view, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  x = jnp.zeros((2, 32, 32, 3), jnp.float32)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x)['out'])

  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert 'scan' in jaxpr
  assert ('_fusion_barrier' in jaxpr) == (platform == 'cpu')


@pytest.mark.slow
def test_scanned_dense_layers_backward_matches_numerical_derivatives():
  """`jax.test_util.check_grads` of the scanned dense layers' written-out
  backward pass (`dense_scan`) against central differences of the
  forward pass, in float64: a 7-layer block (a full chunk of 6 and one of
  a single layer) in training mode. Bound: 1e-6 relative, where float64
  differences with eps 1e-6 are good to about 1e-9; a wrong channel,
  chunk or statistic cotangent moves the projection by far more."""
  with jax.enable_x64(True):
    model = models.create(
      'denseaspp_tiny',
      num_classes=3,
      rngs=nnx.Rngs(0),
      blocks=(1, 7, 1, 1),
      dtype='float64',
    )
    backbone = nnx.view(model.backbone, platform='cpu')  # scans dense layers
    graphdef, params, rest = nnx.split(backbone, nnx.Param, ...)
    wide = lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a
    params = jax.tree.map(wide, nnx.to_pure_dict(params))
    rest = jax.tree.map(wide, nnx.to_pure_dict(rest))  # running statistics
    x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 3))
    features = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(x)['out'])
    assert features(params).dtype == jnp.float64
    assert 'while' in features.lower(params).as_text()
    check_grads(
      features, (params,), order=1, modes=['rev'], eps=1e-6, rtol=1e-6
    )
