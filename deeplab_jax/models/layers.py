"""Shared layers with PyTorch's padding, BatchNorm and resize semantics.

Everything here works on NHWC arrays. Convolution kernels are stored HWIO
(`[kh, kw, C_in / groups, C_out]`); a PyTorch `OIHW` weight converts with one
transpose. Padding is always explicit and symmetric, `p = d * (k - 1) // 2`
by default, as `torch.nn.Conv2d(padding=p)`; never `'SAME'`, which pads a
stride-2 convolution asymmetrically.

How a convolution is lowered is `conv_lowering`'s concern, for the target
platform each module carries as a static attribute (`platform`, set by
`models.platform_view`); the layers here say what is computed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deeplab_jax.models import host_random
from deeplab_jax.models.conv_geometry import pair
from deeplab_jax.models.conv_lowering import LOWERINGS, check_platform, conv2d
from deeplab_jax.models.xla_cpu.fusion import fusion_barrier

# PyTorch BatchNorm2d defaults, written in Flax's convention: Flax keeps
# `momentum * old + (1 - momentum) * new`, PyTorch `(1 - m) * old + m * new`.
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPS = 1e-5


def _kaiming_fan_out(key, shape):
  # torchvision's init for segmentation convs: kaiming_normal_, fan_out, relu.
  kh, kw, _, cout = shape
  return host_random.normal(key, shape, np.sqrt(2.0 / (kh * kw * cout)))


class Conv2d(nnx.Module):
  """`torch.nn.Conv2d` on NHWC inputs; kernel `[kh, kw, C_in/groups, C_out]`.

  `lowering` is a static attribute: `nnx.view(model, conv_lowering='native')`
  switches every convolution of a model at once, and `nnx.view(model,
  forward_only=True)` (`predict.inference_view`) lets `'auto'` pick the
  fastest forward pass for a model that is not differentiated. `platform`
  (`models.platform_view`) is the target `'auto'` chooses for; None, until
  set, gives XLA's own convolutions.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    *,
    stride: int = 1,
    dilation: int = 1,
    padding: int | None = None,
    groups: int = 1,
    use_bias: bool = False,
    rngs: nnx.Rngs,
  ):
    kh, kw = pair(kernel_size)
    if in_channels % groups or out_channels % groups:
      raise ValueError(f'channels {in_channels}->{out_channels} % {groups}')
    shape = (kh, kw, in_channels // groups, out_channels)
    self.kernel = nnx.Param(_kaiming_fan_out(rngs.params(), shape))
    self.bias = (
      nnx.Param(host_random.full((out_channels,), 0.0)) if use_bias else None
    )
    self.stride = stride
    self.dilation = dilation
    self.padding = padding
    self.groups = groups
    self.lowering = 'auto'
    self.forward_only = False
    self.platform = None

  def set_view(
    self,
    conv_lowering: str | None = None,
    forward_only: bool | None = None,
    platform: str | None = None,
  ):
    """Used by `nnx.view`: selects the convolution lowering, whether
    `'auto'` optimises the forward pass alone (inference), and the target
    platform."""
    if platform is not None:
      self.platform = check_platform(platform)
    if conv_lowering is not None:
      if conv_lowering not in LOWERINGS:
        raise ValueError(f'conv_lowering must be one of {LOWERINGS}')
      self.lowering = conv_lowering
    if forward_only is not None:
      self.forward_only = forward_only

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(x.dtype)
    y = conv2d(
      x,
      kernel,
      stride=self.stride,
      dilation=self.dilation,
      padding=self.padding,
      groups=self.groups,
      lowering=self.lowering,
      platform=self.platform,
      forward_only=self.forward_only,
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance per channel (last axis), as training
  BatchNorm normalises with; in float32 at least (float64 stays)."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(xf, axes)
  return mean, jnp.mean(jnp.square(xf - mean), axes)


class BatchNorm(nnx.Module):
  """`torch.nn.BatchNorm2d` over the last axis of an NHWC array.

  Training mode normalises with the batch's biased variance and updates the
  running variance with the unbiased one, as PyTorch does. Statistics are
  computed in float32 whatever the compute dtype. Under `jax.jit` with the
  batch sharded over a mesh the means are global: synchronised BN.
  """

  def __init__(
    self,
    num_features: int,
    *,
    momentum: float = TORCH_BN_MOMENTUM,
    epsilon: float = TORCH_BN_EPS,
    use_running_average: bool = False,
  ):
    self.scale = nnx.Param(host_random.full((num_features,), 1.0))
    self.bias = nnx.Param(host_random.full((num_features,), 0.0))
    self.mean = nnx.BatchStat(host_random.full((num_features,), 0.0))
    self.var = nnx.BatchStat(host_random.full((num_features,), 1.0))
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view`: `True` normalises with the running statistics."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(
    self, x: jax.Array, stats: tuple[jax.Array, jax.Array] | None = None
  ) -> jax.Array:
    """Normalises `x`; in training, `stats` (its `batch_stats`, computed
    once by the caller) saves recomputing them (DenseNet's concatenations,
    whose channels' statistics every later layer shares)."""
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      mean, var = batch_stats(x) if stats is None else stats
      n = int(np.prod(x.shape[:-1]))
      unbiased = var * (n / (n - 1)) if n > 1 else var
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1 - m) * mean
      self.var[...] = m * self.var[...] + (1 - m) * unbiased
    inv = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    shift = self.bias[...] - mean * inv
    return x * inv.astype(x.dtype) + shift.astype(x.dtype)


# Activations by name, for blocks configured with one.
ACTIVATIONS = {
  'relu': jax.nn.relu,
  'relu6': jax.nn.relu6,
  'hardswish': jax.nn.hard_swish,
  'none': lambda x: x,
}


class ConvBN(nnx.Module):
  """Conv2d (no bias), BatchNorm, then an activation (`ACTIVATIONS` name;
  `'none'` for none): torchvision's `Conv2dNormActivation`."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    activation: str = 'relu',
    bn_momentum: float = TORCH_BN_MOMENTUM,
    epsilon: float = TORCH_BN_EPS,
    rngs: nnx.Rngs,
  ):
    self.conv = Conv2d(
      in_channels,
      out_channels,
      kernel_size,
      stride=stride,
      dilation=dilation,
      groups=groups,
      rngs=rngs,
    )
    self.bn = BatchNorm(out_channels, momentum=bn_momentum, epsilon=epsilon)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.activation](self.bn(self.conv(x)))


class SeparableConvBN(nnx.Module):
  """Depthwise kxk conv, then pointwise 1x1 conv + BN (+ ReLU).

  `bn_between=True` puts BN (and, with `relu`, ReLU) after the depthwise conv
  too: the DeepLabV3+ paper's aligned Xception and timm's `SeparableConv2d`.
  `bn_between=False` is segmentation_models_pytorch's form (depthwise,
  pointwise, then one BN + ReLU). Names follow timm (`conv_dw`, `bn_dw`,
  `conv_pw`, `bn_pw`).
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    dilation: int = 1,
    bn_between: bool = True,
    relu: bool = True,
    epsilon: float = TORCH_BN_EPS,
    rngs: nnx.Rngs,
  ):
    self.conv_dw = Conv2d(
      in_channels,
      in_channels,
      kernel_size,
      stride=stride,
      dilation=dilation,
      groups=in_channels,
      rngs=rngs,
    )
    self.bn_dw = BatchNorm(in_channels, epsilon=epsilon) if bn_between else None
    self.conv_pw = Conv2d(in_channels, out_channels, 1, rngs=rngs)
    self.bn_pw = BatchNorm(out_channels, epsilon=epsilon)
    self.relu = relu

  def __call__(self, x: jax.Array) -> jax.Array:
    act = jax.nn.relu if self.relu else (lambda y: y)
    y = self.conv_dw(x)
    if self.bn_dw is not None:
      y = act(self.bn_dw(y))
    return act(self.bn_pw(self.conv_pw(y)))


def global_avg_pool(x: jax.Array) -> jax.Array:
  """`[B, H, W, C]` -> `[B, 1, 1, C]` mean, as `nn.AdaptiveAvgPool2d(1)`."""
  return jnp.mean(x, axis=(1, 2), keepdims=True)


def max_pool(
  x: jax.Array, kernel_size: int, stride: int, padding: int = 0
) -> jax.Array:
  """`nn.MaxPool2d(kernel_size, stride, padding)` (floor mode), NHWC."""
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(
    x,
    -jnp.inf,  # a Python scalar: lax only differentiates constant inits
    jax.lax.max,
    (1, kernel_size, kernel_size, 1),
    (1, stride, stride, 1),
    pads,
  )


def avg_pool(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """`nn.AvgPool2d(kernel_size, stride)` without padding, NHWC."""
  window = (1, kernel_size, kernel_size, 1)
  total = jax.lax.reduce_window(
    x,
    0.0,
    jax.lax.add,
    window,
    (1, stride, stride, 1),
    'VALID',
  )
  return total / (kernel_size * kernel_size)


@functools.lru_cache(maxsize=256)
def interpolation_matrix(
  in_size: int, out_size: int, align_corners: bool
) -> np.ndarray:
  """The `[out, in]` matrix of 1-D linear interpolation as PyTorch does it.

  `align_corners=False` maps output pixel centres with
  `src = (dst + 0.5) * in / out - 0.5`, clamped at 0 (half-pixel centres, no
  antialiasing, for up- and down-sampling alike); `align_corners=True` with
  `src = dst * (in - 1) / (out - 1)`.
  """
  # Index arithmetic in float32, as PyTorch's CPU and CUDA kernels do it.
  f32 = np.float32
  dst = np.arange(out_size, dtype=f32)
  if align_corners:
    scale = f32((in_size - 1) / (out_size - 1)) if out_size > 1 else f32(0)
    src = dst * scale
  else:
    scale = f32(f32(in_size) / f32(out_size))
    # One rounding for the multiply-add, as the compiled kernels' FMA.
    src = (scale.astype(np.float64) * (dst + f32(0.5)) - 0.5).astype(f32)
    src = np.maximum(src, f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0.astype(f32)).astype(f32)
  m = np.zeros((out_size, in_size), f32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), f32(1) - lam)
  np.add.at(m, (rows, i1), lam)
  return m.astype(np.float32)


def resize_bilinear(
  x: jax.Array, size: Sequence[int], *, align_corners: bool = False
) -> jax.Array:
  """`F.interpolate(x, size, mode='bilinear', align_corners=...)` on NHWC.

  Written as two small matmuls, which lowers well on every backend and is
  exact in float32 (`precision=HIGHEST`, so GPUs do not use TF32 here).
  """
  oh, ow = (int(s) for s in size)
  _, h, w, _ = x.shape
  if (oh, ow) == (h, w):
    return x
  hp = jax.lax.Precision.HIGHEST
  if oh != h:
    mh = jnp.asarray(interpolation_matrix(h, oh, align_corners), x.dtype)
    x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=hp)
  if ow != w:
    mw = jnp.asarray(interpolation_matrix(w, ow, align_corners), x.dtype)
    x = jnp.einsum('pw,bowc->bopc', mw, x, precision=hp)
  return x


def _signature(module: nnx.Module):
  """`(graphdef, shapes and dtypes of its state)`: equal for blocks one
  scan can run."""
  graphdef, state = nnx.split(module)
  shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), state)
  return graphdef, tuple(
    jax.tree.leaves(shapes, is_leaf=lambda v: isinstance(v, tuple))
  )


class RematBlocks:
  """Mixin for backbones, which run every residual / dense / Xception block
  through `block`: `nnx.view(model, remat_blocks=True)` makes each block
  recompute its activations during the backward pass (`nnx.remat`), keeping
  only block inputs alive. `nnx.view(model, scan_blocks=True)` runs each
  run of identical consecutive blocks of a stage (`stage`) as one
  `jax.lax.scan` over their stacked weights, so XLA compiles the block
  once instead of once per block (DenseNet, whose layers grow, scans
  chunks of them over padded weights instead on XLA:CPU, `dense_scan`);
  the weights stay per block (checkpoints and converters do not change).
  `platform` is the target platform (`models.platform_view`)."""

  remat_blocks: bool = False
  scan_blocks: bool = False
  platform: str | None = None

  def set_view(
    self,
    remat_blocks: bool | None = None,
    scan_blocks: bool | None = None,
    platform: str | None = None,
  ):
    """Used by `nnx.view`: rematerialise each block in backward; scan
    identical consecutive blocks; the target platform."""
    if platform is not None:
      self.platform = check_platform(platform)
    if remat_blocks is not None:
      self.remat_blocks = remat_blocks
    if scan_blocks is not None:
      self.scan_blocks = scan_blocks

  def block(self, module: nnx.Module, *args):
    """`module(*args)`, rematerialised when `remat_blocks` is on. On XLA:CPU
    its output (the first, for a block that returns several) passes through
    `xla_cpu.fusion.fusion_barrier`: a block's output feeds the next
    block's residual sum or concatenation, the chain XLA:CPU would
    otherwise recompute."""
    if self.remat_blocks:
      out = nnx.remat(lambda m, *a: m(*a))(module, *args)
    else:
      out = module(*args)
    if self.platform != 'cpu':
      return out
    if isinstance(out, tuple):
      return (fusion_barrier(out[0]), *out[1:])
    return fusion_barrier(out)

  def stage(self, modules: Sequence[nnx.Module], x: jax.Array) -> jax.Array:
    """`x` through `modules` (blocks mapping one array to one array) in
    order, each through `block`; with `scan_blocks`, runs of at least two
    structurally identical blocks as one scan."""
    if not self.scan_blocks:
      for m in modules:
        x = self.block(m, x)
      return x
    i = 0
    while i < len(modules):
      graphdef, signature = _signature(modules[i])
      j = i + 1
      while j < len(modules) and _signature(modules[j]) == (
        graphdef,
        signature,
      ):
        j += 1
      if j - i < 2:
        x = self.block(modules[i], x)
      else:
        x = self._scan(modules[i:j], graphdef, x)
      i = j
    return x

  def _scan(self, modules, graphdef, x):
    stacked = jax.tree.map(
      lambda *a: jnp.stack(a), *[nnx.split(m)[1] for m in modules]
    )

    def body(x, state):
      m = nnx.merge(graphdef, state)
      return self.block(m, x), nnx.split(m)[1]

    x, states = jax.lax.scan(body, x, stacked)
    for k, m in enumerate(modules):  # BatchNorm statistics, in training
      nnx.update(m, jax.tree.map(lambda a, k=k: a[k], states))
    return x
