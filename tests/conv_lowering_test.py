"""Convolution lowerings against PyTorch and float64 NumPy: every lowering,
tap pruning, the lowering choice, the fusion barrier, the Winograd and
matmul custom gradients."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from deeplab_jax import models, predict
from deeplab_jax.models import conv_geometry, conv_lowering, layers
from deeplab_jax.models.xla_cpu import conv as xla_cpu_conv
from deeplab_jax.models.xla_cpu import fusion
from tests.torch_refs import nchw, nhwc, rel_err

CONV_CASES = [
  # (H, W, cin, cout, k, stride, dilation, padding, groups)
  (13, 17, 5, 7, 3, 1, 1, None, 1),
  (13, 17, 5, 7, 3, 2, 1, None, 1),
  (14, 9, 4, 6, 7, 2, 1, 3, 1),  # ResNet stem shape
  (9, 11, 4, 6, 3, 1, 6, None, 1),  # some taps read only padding
  (5, 7, 3, 4, 3, 1, 12, None, 1),  # only the centre tap is live
  (8, 8, 3, 4, 3, 1, 24, None, 1),
  (11, 6, 3, 5, 3, 2, 4, None, 1),  # strided and dilated
  (12, 10, 6, 6, 3, 1, 2, None, 6),  # depthwise
  (12, 10, 6, 6, 3, 2, 1, None, 6),  # depthwise strided
  (12, 10, 6, 12, 3, 1, 1, None, 3),  # grouped
  (10, 10, 5, 3, 1, 2, 1, 0, 1),  # strided 1x1 (downsample)
  (6, 6, 2, 3, 5, 1, 1, 1, 1),  # padding smaller than 'same'
  (7, 6, 3, 4, 3, 1, 3, None, 1),  # outputs not a whole number of tiles
  (9, 8, 3, 4, 3, 1, 2, 0, 1),  # no padding
  (10, 7, 2, 3, 3, 1, 1, 2, 1),  # more padding than 'same'
]


@pytest.mark.parametrize('case', CONV_CASES, ids=str)
def test_conv_lowerings_match_torch(case):
  h, w, cin, cout, k, s, d, p, g = case
  rng = np.random.RandomState(1)
  x = rng.randn(2, h, w, cin).astype(np.float32)
  wt = rng.randn(cout, cin // g, k, k).astype(np.float32)
  pad = d * (k - 1) // 2 if p is None else p
  ref = nhwc(
    F.conv2d(
      nchw(x), torch.from_numpy(wt), stride=s, padding=pad, dilation=d, groups=g
    )
  )
  kernel = jnp.asarray(wt.transpose(2, 3, 1, 0))
  for lowering, prune in itertools.product(
    conv_lowering.LOWERINGS, (True, False)
  ):
    out = jax.jit(
      lambda x, kern, lowering=lowering, prune=prune: conv_lowering.conv2d(
        x,
        kern,
        stride=s,
        dilation=d,
        padding=p,
        groups=g,
        lowering=lowering,
        prune=prune,
      )
    )(jnp.asarray(x), kernel)
    assert out.shape == ref.shape, (lowering, prune)
    assert rel_err(out, ref) < 2e-6, (lowering, prune)


@pytest.mark.parametrize(
  'case',
  [
    (9, 11, 4, 6, 3, 1, 6, None),  # taps reach part of the outputs
    (30, 26, 3, 5, 3, 1, 18, None),  # bands with 2, 1 and 2 live taps
    (11, 6, 3, 5, 3, 2, 4, None),  # strided and dilated
    (10, 7, 2, 3, 3, 1, 1, 2),  # more padding than 'same'
  ],
  ids=str,
)
def test_conv_lowering_gradients_match_torch(case):
  # Input and weight gradients of every dense lowering against autograd.
  h, w, cin, cout, k, s, d, p = case
  rng = np.random.RandomState(h + w)
  x = rng.randn(2, h, w, cin).astype(np.float32)
  wt = rng.randn(cout, cin, k, k).astype(np.float32)
  tx = nchw(x).requires_grad_(True)
  tw = torch.from_numpy(wt).requires_grad_(True)
  pad = d * (k - 1) // 2 if p is None else p
  ty = F.conv2d(tx, tw, stride=s, padding=pad, dilation=d)
  g = rng.randn(*ty.shape).astype(np.float32)
  (ty * torch.from_numpy(g)).sum().backward()
  want_dx, want_dk = nhwc(tx.grad), tw.grad.numpy().transpose(2, 3, 1, 0)
  for lowering in conv_lowering.LOWERINGS:
    loss = lambda x, kern, lowering=lowering: jnp.sum(
      conv_lowering.conv2d(
        x, kern, stride=s, dilation=d, padding=p, lowering=lowering
      )
      * nhwc(torch.from_numpy(g))
    )
    dx, dk = jax.jit(jax.grad(loss, (0, 1)))(
      jnp.asarray(x), jnp.asarray(wt.transpose(2, 3, 1, 0))
    )
    assert rel_err(dx, want_dx) < 2e-6, lowering
    assert rel_err(dk, want_dk) < 2e-6, lowering


def test_prune_plan_hand_computed():
  # 5 rows, 3 taps at dilation 6, padding 6: taps 0 and 2 read rows -6..-2
  # and 6..10 only, i.e. padding; the centre tap alone survives.
  (si, sj), pads = conv_geometry.prune_padding_taps(
    (5, 5), (3, 3), (1, 1), (6, 6), ((6, 6), (6, 6))
  )
  assert (si, sj) == (slice(1, 2), slice(1, 2))
  assert pads == ((0, 0), (0, 0))
  # 9 rows, dilation 6: tap 0 reads rows o - 6, live for o >= 6 -> all kept.
  (si, _), pads = conv_geometry.prune_padding_taps(
    (9, 9), (3, 3), (1, 1), (6, 6), ((6, 6), (6, 6))
  )
  assert si == slice(0, 3) and pads[0] == (6, 6)


def test_choose_lowering_defaults():
  # XLA:CPU: Winograd for float32 3x3 stride 1 (any dilation), else im2col.
  assert conv_lowering.choose_lowering((3, 3, 8, 8), 1, 'cpu') == 'winograd'
  assert conv_lowering.choose_lowering((3, 3, 8, 8), 1, 'cpu', 12) == 'winograd'
  assert (
    conv_lowering.choose_lowering((3, 3, 8, 8), 1, 'cpu', stride=2) == 'im2col'
  )
  assert conv_lowering.choose_lowering((1, 3, 8, 8), 1, 'cpu', 12) == 'im2col'
  assert (
    conv_lowering.choose_lowering((7, 7, 3, 8), 1, 'cpu', stride=2) == 'im2col'
  )
  bf16 = conv_lowering.choose_lowering(
    (3, 3, 8, 8), 1, 'cpu', dtype=jnp.bfloat16
  )
  assert bf16 == 'im2col'
  # Depthwise (the MobileNets' main work): per-tap on XLA:CPU, XLA's own
  # grouped convolution on GPU and TPU.
  assert conv_lowering.choose_lowering((3, 3, 1, 8), 8, 'cpu') == 'taps'
  assert conv_lowering.choose_lowering((5, 5, 1, 96), 96, 'gpu', 2) == 'native'
  assert conv_lowering.choose_lowering((3, 3, 1, 96), 96, 'tpu') == 'native'
  # Dense per-tap matmuls where large dilations leave taps partly in the
  # padding (ASPP at output stride 8, 64x64 maps): rate 24 reaches 2.25
  # taps per output in each dimension, 5.06 in all, against Winograd's 9
  # (2x2-tile padding 2.25x) and im2col's 9.
  aspp = dict(dilation=24, out_hw=(64, 64))
  live = conv_geometry.live_taps_per_output(
    (64, 64), (3, 3), (1, 1), (24, 24), ((24, 24), (24, 24))
  )
  assert live == pytest.approx(2.25**2)
  assert (
    conv_lowering.choose_lowering(
      (3, 3, 8, 8), 1, 'cpu', live_taps=live, **aspp
    )
    == 'taps'
  )
  # Rate 3 keeps 8.4 of 9 taps: Winograd; strided 8.4: im2col.
  live3 = conv_geometry.live_taps_per_output(
    (64, 64), (3, 3), (1, 1), (3, 3), ((3, 3), (3, 3))
  )
  assert live3 == pytest.approx((186 / 64) ** 2)
  wino = conv_lowering.choose_lowering(
    (3, 3, 8, 8), 1, 'cpu', 3, live_taps=live3
  )
  assert wino == 'winograd'
  strided = conv_lowering.choose_lowering(
    (3, 3, 8, 8), 1, 'cpu', 3, 2, live_taps=live3
  )
  assert strided == 'im2col'
  # No Winograd in bfloat16: taps against im2col alone.
  bf16_aspp = conv_lowering.choose_lowering(
    (3, 3, 8, 8), 1, 'cpu', dtype=jnp.bfloat16, live_taps=live, **aspp
  )
  assert bf16_aspp == 'taps'
  gpu_aspp = conv_lowering.choose_lowering(
    (3, 3, 8, 8), 1, 'gpu', live_taps=live, **aspp
  )
  assert gpu_aspp == 'im2col'
  assert conv_lowering.choose_lowering((3, 3, 8, 8), 1, 'gpu') == 'native'
  # Dense dilated convolutions on GPU: one matmul over patches.
  assert conv_lowering.choose_lowering((3, 3, 8, 8), 1, 'gpu', 2) == 'im2col'
  assert (
    conv_lowering.choose_lowering((1, 3, 8, 8), 1, 'gpu', (12, 12)) == 'im2col'
  )
  assert (
    conv_lowering.choose_lowering((3, 1, 8, 8), 1, 'gpu', (1, 4)) == 'native'
  )
  assert conv_lowering.choose_lowering((1, 1, 8, 8), 1, 'gpu', 2) == 'native'
  assert conv_lowering.choose_lowering((3, 3, 1, 8), 8, 'gpu', 2) == 'native'
  assert conv_lowering.choose_lowering((3, 3, 8, 8), 1, 'tpu', 2) == 'native'
  # TPU: a dense 1x1 convolution is one matmul, at any stride; a grouped
  # one stays a convolution.
  assert conv_lowering.choose_lowering((1, 1, 8, 8), 1, 'tpu') == 'im2col'
  assert (
    conv_lowering.choose_lowering((1, 1, 8, 8), 1, 'tpu', stride=2) == 'im2col'
  )
  assert conv_lowering.choose_lowering((1, 1, 2, 8), 4, 'tpu') == 'native'
  with pytest.raises(ValueError, match='lowering'):
    conv_lowering.conv2d(
      jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), lowering='fft'
    )


@pytest.mark.parametrize('stride', [1, 2])
def test_tpu_computes_a_1x1_convolution_as_one_matmul(stride):
  # What a TPU program traces (`platform='tpu'`: the choice is static, so
  # the same jaxpr runs here): one dot, no convolution, torch's values.
  rng = np.random.RandomState(stride)
  x = rng.randn(2, 9, 9, 16).astype(np.float32)
  wt = rng.randn(24, 16, 1, 1).astype(np.float32)
  kernel = jnp.asarray(wt.transpose(2, 3, 1, 0))
  conv = lambda x, k: conv_lowering.conv2d(x, k, stride=stride, platform='tpu')
  jaxpr = str(jax.make_jaxpr(conv)(x, kernel))
  assert 'dot_general' in jaxpr and 'conv_general_dilated' not in jaxpr
  want = nhwc(F.conv2d(nchw(x), torch.from_numpy(wt), stride=stride))
  assert rel_err(conv(x, kernel), want) < 1e-6


def test_forward_only_lowering_for_inference():
  # ASPP rate 12 at output stride 8 (64x64 map): taps need 6.89 multiplies
  # per output, Winograd 4 x 1.27 (its 2x2 tiles padded to 72x72), 1.36x
  # fewer: taps train faster, Winograd runs the forward pass faster.
  pads = ((12, 12), (12, 12))
  live = conv_geometry.live_taps_per_output(
    (64, 64), (3, 3), (1, 1), (12, 12), pads
  )
  assert live == pytest.approx((168 / 64) ** 2)
  rate12 = dict(dilation=12, out_hw=(64, 64), live_taps=live)
  assert (
    conv_lowering.choose_lowering((3, 3, 8, 8), 1, 'cpu', **rate12) == 'taps'
  )
  inference = conv_lowering.choose_lowering(
    (3, 3, 8, 8), 1, 'cpu', forward_only=True, **rate12
  )
  assert inference == 'winograd'
  # Rate 24 (5.06 against Winograd's 9): taps either way.
  live24 = conv_geometry.live_taps_per_output(
    (64, 64), (3, 3), (1, 1), (24, 24), ((24, 24), (24, 24))
  )
  rate24 = dict(dilation=24, out_hw=(64, 64), live_taps=live24)
  assert (
    conv_lowering.choose_lowering(
      (3, 3, 8, 8), 1, 'cpu', forward_only=True, **rate24
    )
    == 'taps'
  )
  # Both choices give F.conv2d's numbers on that shape.
  rng = np.random.RandomState(0)
  x = rng.randn(2, 64, 64, 8).astype(np.float32)
  k = rng.randn(3, 3, 8, 8).astype(np.float32)
  tk = torch.from_numpy(k.transpose(3, 2, 0, 1))
  ref = nhwc(F.conv2d(nchw(x), tk, padding=12, dilation=12))
  for forward_only in (False, True):
    y = conv_lowering.conv2d(
      x, k, dilation=12, forward_only=forward_only, platform='cpu'
    )
    assert rel_err(y, ref) < 2e-6
  # The inference view reaches every convolution, not the training model's.
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=3, rngs=nnx.Rngs(0)
  )
  view = predict.inference_view(model)
  convs = [m for _, m in nnx.iter_graph(view) if isinstance(m, layers.Conv2d)]
  assert convs and all(c.forward_only for c in convs)
  assert not any(
    m.forward_only
    for _, m in nnx.iter_graph(model)
    if isinstance(m, layers.Conv2d)
  )


def _max_fusion_operands(fn, *args) -> int:
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  fusions = re.findall(r'= \S+ fusion\((.*?)\), kind=', hlo)
  return max(len(f.split(', ')) for f in fusions)


def test_fusion_barrier_is_exact_and_stops_residual_recomputation():
  x = np.random.RandomState(0).randn(2, 4, 4, 8).astype(np.float32) * 1e30
  x[0, 0, 0, :2] = (-0.0, 0.0)
  y = np.asarray(fusion.fusion_barrier(jnp.asarray(x)))
  np.testing.assert_array_equal(y.view(np.uint32), x.view(np.uint32))
  w = jnp.asarray(np.random.RandomState(1).randn(*x.shape), jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(fusion.fusion_barrier(v) * w))(x)
  np.testing.assert_array_equal(grad, w)

  # A residual stream: out_k = relu(out_{k-1} @ w_k * s + out_{k-1}). XLA:CPU
  # duplicates each elementwise block output into the next block's, so the
  # last fusion reads every block's matmul; the barrier keeps each to its own.
  def stream(barrier):
    def run(x, ws):
      for w in ws:
        x = jax.nn.relu(xla_cpu_conv.matmul(x, w) * 0.5 + x)
        x = barrier(x)
      return x

    return run

  ws = [jnp.eye(8) * (k + 1) for k in range(8)]
  xs = jnp.ones((1, 4, 4, 8))
  assert _max_fusion_operands(stream(lambda v: v), xs, ws) >= 8
  assert _max_fusion_operands(stream(fusion.fusion_barrier), xs, ws) <= 3


@pytest.mark.parametrize('k,n', [(36, 8), (8, 36)])
def test_matmul_weight_gradient_form_gives_autodiff_gradients(k, n):
  # On CPU the weight gradient is a 2-D product contracting the pixel axis
  # of both operands (a custom VJP); both gradients must equal plain
  # autodiff's, for K > N and K < N.
  rng = np.random.RandomState(k)
  x = jnp.asarray(rng.randn(2, 5, 7, k), jnp.float32)
  w = jnp.asarray(rng.randn(k, n), jnp.float32)
  g = jnp.asarray(rng.randn(2, 5, 7, n), jnp.float32)
  loss = lambda x, w, matmul: jnp.sum(matmul(x, w) * g)
  got = jax.grad(loss, argnums=(0, 1))(x, w, xla_cpu_conv.matmul)
  want = jax.grad(loss, argnums=(0, 1))(x, w, xla_cpu_conv.einsum_matmul)
  np.testing.assert_allclose(xla_cpu_conv.matmul(x, w), x @ w, rtol=1e-5)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Reference in float64 NumPy for the weight gradient.
  dw = np.einsum('bhwk,bhwn->kn', np.float64(x), np.float64(g))
  np.testing.assert_allclose(got[1], dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
  'hw,dilation,padding',
  [((12, 12), 1, 1), ((11, 9), 2, 2), ((13, 10), 5, 5), ((9, 9), 3, (1, 4))],
)
def test_winograd_values_and_gradients_match_float64(hw, dilation, padding):
  # Winograd F(2x2, 3x3) against a float64 NumPy convolution, and its
  # gradients (through the tile transforms and the transposed weight
  # gradient) against float64 NumPy ones.
  rng = np.random.RandomState(sum(hw) + dilation)
  x = rng.randn(2, *hw, 6).astype(np.float32)
  k = rng.randn(3, 3, 6, 5).astype(np.float32)
  ph, pw = conv_geometry.pair(padding)
  xp = np.pad(np.float64(x), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  oh = hw[0] + 2 * ph - 2 * dilation
  ow = hw[1] + 2 * pw - 2 * dilation
  taps = {
    (i, j): xp[:, i * dilation : i * dilation + oh, j * dilation :][:, :, :ow]
    for i in range(3)
    for j in range(3)
  }
  want = sum(t @ np.float64(k[i, j]) for (i, j), t in taps.items())
  g = rng.randn(*want.shape)
  want_dk = np.stack(
    [np.einsum('bhwc,bhwn->cn', taps[i, j], g) for i, j in taps]
  ).reshape(k.shape)

  def loss(x, k):
    y = conv_lowering.conv2d(
      x, k, dilation=dilation, padding=padding, lowering='winograd'
    )
    return jnp.sum(y * jnp.asarray(g, jnp.float32)), y

  (_, y), (dx, dk) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
    jnp.asarray(x), jnp.asarray(k)
  )
  assert rel_err(y, want) < 2e-6
  assert rel_err(dk, want_dk) < 2e-6
  # dx against the transpose of XLA's own convolution (float32 autodiff).
  native = lambda x: conv_lowering.conv2d(
    x,
    jnp.asarray(k, jnp.float32),
    dilation=dilation,
    padding=padding,
    lowering='native',
  )
  _, vjp = jax.vjp(native, jnp.asarray(x))
  assert rel_err(dx, vjp(jnp.asarray(g, jnp.float32))[0]) < 2e-6
