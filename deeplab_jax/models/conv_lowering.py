"""How a convolution is computed: PyTorch's `Conv2d` semantics, lowered for
the platform the program is compiled for.

`conv2d` first drops the dilated taps that can only ever read padding
(exact, on every platform), then picks how the convolution is lowered from
static shapes and the target platform (`choose_lowering`): XLA's native
convolution on TPU and GPU, except dense dilated ones on GPU (one matmul
over gathered patches, `im2col`) and dense 1x1 ones on TPU (one matmul);
on XLA:CPU the matmul lowerings of
`xla_cpu.conv`. The platform is a static argument, set from the devices a
program is compiled for (`models.platform_view`), never from the process's
default backend: a TPU program built on a CPU host gets TPU convolutions.

Padding is always explicit and symmetric, `p = d * (k - 1) // 2` by default,
as `torch.nn.Conv2d(padding=p)`; never `'SAME'`, which pads a stride-2
convolution asymmetrically. Arrays are NHWC, kernels HWIO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from deeplab_jax.models import conv_geometry as geometry
from deeplab_jax.models.conv_geometry import (
  live_taps_per_output,
  pair,
  prune_padding_taps,
)
from deeplab_jax.models.xla_cpu import conv as xla_cpu_conv

LOWERINGS = ('auto', 'native', 'im2col', 'taps', 'winograd')
# What `platform` may be: a device's `platform` ('cpu', 'gpu', 'tpu'), or
# None for a program whose platform is not known (XLA's own kernels).
PLATFORMS = (None, 'cpu', 'gpu', 'tpu')


def check_platform(platform: str | None) -> str | None:
  """`platform` itself, or a `ValueError` naming the valid ones."""
  if platform not in PLATFORMS:
    raise ValueError(f'unknown platform {platform!r}; one of {PLATFORMS}')
  return platform


def _native(x, kernel, stride, dilation, padding, groups):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=stride,
    padding=padding,
    rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )


def im2col(
  x: jax.Array,
  kernel: jax.Array,
  stride,
  dilation,
  padding,
  out_hw,
  matmul: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """The convolution as one `matmul` of `[B, Ho, Wo, kh kw C]` patches by
  the `[kh kw C, C_out]` kernel (`matmul`: `jnp.einsum` by default)."""
  if matmul is None:
    matmul = lambda p, w: jnp.einsum('bhwc,cd->bhwd', p, w)
  kh, kw, cin, cout = kernel.shape
  xp = geometry.pad(x, padding)
  slices = geometry.tap_slices(xp, kh, kw, out_hw, stride, dilation)
  taps = [t for _, _, t in slices]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return matmul(patches, kernel.reshape(kh * kw * cin, cout))


def choose_lowering(
  kernel_shape: Sequence[int],
  groups: int,
  platform: str | None,
  dilation: int | Sequence[int] = 1,
  stride: int | Sequence[int] = 1,
  dtype=jnp.float32,
  out_hw: Sequence[int] | None = None,
  live_taps: float | None = None,
  forward_only: bool = False,
) -> str:
  """The lowering `'auto'` resolves to on `platform`, from static shapes.

  `'cpu'`: `xla_cpu.conv.choose_lowering` (matmul lowerings, measured).
  GPUs and TPUs keep their native convolutions (cuDNN, the TPU MXU path),
  except dense dilated ones on GPU: cuDNN's kernels for their weight
  gradient are slow, and one matmul over patches is faster there
  (docs/benchmarks.md); and dense 1x1 ones on TPU, one matmul, which moves
  fewer bytes (docs/tpu.md). An unknown platform (None) gets XLA's own.
  `kernel_shape` and `dilation` are those left after padding-only taps are
  pruned.
  """
  check_platform(platform)
  if platform == 'cpu':
    return xla_cpu_conv.choose_lowering(
      kernel_shape,
      groups,
      stride=stride,
      dilation=dilation,
      dtype=dtype,
      out_hw=out_hw,
      live_taps=live_taps,
      forward_only=forward_only,
    )
  kh, kw = kernel_shape[:2]
  dh, dw = pair(dilation)
  dilated = (kh > 1 and dh > 1) or (kw > 1 and dw > 1)
  dense = groups == 1
  if platform == 'tpu' and (kh, kw) == (1, 1) and dense:
    # One matmul: its weight gradient then reads the activations in their
    # own layout, where the convolution's copies them into another first
    # (docs/tpu.md, "Bytes per image").
    return 'im2col'
  return 'im2col' if platform == 'gpu' and dilated and dense else 'native'


def conv2d(
  x: jax.Array,
  kernel: jax.Array,
  *,
  stride: int | Sequence[int] = 1,
  dilation: int | Sequence[int] = 1,
  padding: int | Sequence[int] | None = None,
  groups: int = 1,
  lowering: str = 'auto',
  platform: str | None = None,
  prune: bool = True,
  forward_only: bool = False,
) -> jax.Array:
  """2-D convolution with PyTorch's `Conv2d` semantics on NHWC arrays.

  Args:
    x: input `[B, H, W, C_in]`.
    kernel: `[kh, kw, C_in / groups, C_out]`.
    stride: stride, an int or `(sh, sw)`.
    dilation: dilation, an int or `(dh, dw)`.
    padding: symmetric zero padding per side, an int or `(ph, pw)`; `None`
      gives `dilation * (k - 1) // 2`, which keeps the size at stride 1.
    groups: feature groups (`C_in` for a depthwise convolution).
    lowering: `'auto'`, `'native'`, `'im2col'`, `'taps'` or `'winograd'`
      (3x3 stride-1 kernels after pruning; others fall back to `'im2col'`).
    platform: the platform the program is compiled for (`PLATFORMS`):
      what `'auto'` chooses for, and whether matmuls take XLA:CPU's weight
      gradient form.
    prune: drop kernel taps that can only read padding (exact).
    forward_only: no gradient will be taken (inference): `'auto'` picks the
      fastest forward pass rather than the fastest training step.

  Returns:
    `[B, Ho, Wo, C_out]`, with `Ho = (H + 2 ph - dh (kh - 1) - 1) // sh + 1`.
  """
  if lowering not in LOWERINGS:
    raise ValueError(f'unknown conv lowering {lowering!r}; one of {LOWERINGS}')
  check_platform(platform)
  kh, kw, cin_g, cout = kernel.shape
  if x.shape[-1] != cin_g * groups:
    raise ValueError(
      f'conv2d: input has {x.shape[-1]} channels, kernel {kernel.shape} with'
      f' groups={groups} expects {cin_g * groups}'
    )
  stride, dilation = pair(stride), pair(dilation)
  if padding is None:
    padding = (dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2)
  ph, pw = pair(padding)
  pads = ((ph, ph), (pw, pw))
  in_hw = x.shape[1:3]
  if prune and (kh, kw) != (1, 1):
    (si, sj), pads = prune_padding_taps(in_hw, (kh, kw), stride, dilation, pads)
    kernel = kernel[si, sj]
    kh, kw = kernel.shape[:2]
  out_hw = tuple(
    geometry.conv_out_size(n, k, s, d, lo, hi)
    for n, k, s, d, (lo, hi) in zip(
      in_hw, (kh, kw), stride, dilation, pads, strict=True
    )
  )
  if lowering == 'auto':
    lowering = choose_lowering(
      kernel.shape,
      groups,
      platform,
      dilation=dilation,
      stride=stride,
      dtype=x.dtype,
      out_hw=out_hw,
      live_taps=live_taps_per_output(in_hw, (kh, kw), stride, dilation, pads),
      forward_only=forward_only,
    )
  depthwise = groups > 1 and cin_g == 1 and cout == groups
  if lowering == 'native' or (groups > 1 and not depthwise):
    return _native(x, kernel, stride, dilation, pads, groups)
  if depthwise:
    return xla_cpu_conv.depthwise(x, kernel, stride, dilation, pads, out_hw)
  if lowering == 'winograd' and (kh, kw) == (3, 3) and stride == (1, 1):
    return xla_cpu_conv.winograd(x, kernel, dilation, pads, out_hw)
  if (kh, kw) == (1, 1) or lowering in ('im2col', 'winograd'):
    matmul = xla_cpu_conv.matmul if platform == 'cpu' else None
    return im2col(x, kernel, stride, dilation, pads, out_hw, matmul)
  return xla_cpu_conv.per_tap(x, kernel, stride, dilation, pads, out_hw)
