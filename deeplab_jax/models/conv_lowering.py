"""How a convolution is computed: PyTorch's `Conv2d` semantics, lowered for
the backend.

`conv2d` picks how a convolution is lowered (XLA's native convolution, one
big matmul over gathered patches, one matmul per kernel tap, or Winograd's
minimal filtering) from static shapes, and first drops the dilated taps that
can only ever read padding. All lowerings give the same numbers up to float
rounding; on XLA:CPU the choice changes speed 2-4x (see docs/benchmarks.md).
`fusion_barrier` keeps XLA:CPU from recomputing a residual stream in every
block. This is the one module of the models that looks at the backend: the
layers and backbones describe what is computed, this module how.

Padding is always explicit and symmetric, `p = d * (k - 1) // 2` by default,
as `torch.nn.Conv2d(padding=p)`; never `'SAME'`, which pads a stride-2
convolution asymmetrically. Arrays are NHWC, kernels HWIO.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOWERINGS = ('auto', 'native', 'im2col', 'taps', 'winograd')


def pair(v: int | Sequence[int]) -> tuple[int, int]:
  """`(v, v)` for an int, else the two values as ints."""
  if isinstance(v, int):
    return (v, v)
  a, b = v
  return (int(a), int(b))


def _conv_out_size(size: int, k: int, s: int, d: int, lo: int, hi: int):
  return (size + lo + hi - d * (k - 1) - 1) // s + 1


def _live_taps(size: int, k: int, s: int, d: int, lo: int, hi: int):
  """Returns the first and last kernel taps that read real input.

  Output `o` reads input index `o * s + i * d - lo` through tap `i`; a tap
  that never lands inside `[0, size)` multiplies padding only and can be
  dropped exactly. Live taps form a contiguous range because the read index
  grows with `i`.
  """
  out = _conv_out_size(size, k, s, d, lo, hi)
  live = []
  for i in range(k):
    first = i * d - lo
    # Smallest o with o * s + first >= 0, then check it is < size.
    o = max(0, -(first // s) if first < 0 else 0)
    while o < out and o * s + first < 0:
      o += 1
    if o < out and o * s + first < size:
      live.append(i)
  if not live:
    raise ValueError(
      f'convolution reads only padding (size {size}, kernel {k}, stride {s},'
      f' dilation {d}, padding {lo},{hi})'
    )
  return live[0], live[-1], out


def prune_padding_taps(
  in_hw: tuple[int, int],
  kernel_hw: tuple[int, int],
  stride: tuple[int, int],
  dilation: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
):
  """Plans the exact removal of taps that only read padding.

  Args:
    in_hw: input height and width.
    kernel_hw: kernel height and width.
    stride: stride per spatial dimension.
    dilation: dilation per spatial dimension.
    padding: `((top, bottom), (left, right))`.

  Returns:
    `(slices, new_padding)`: the kernel slice per spatial dimension and the
    padding that keeps the output size unchanged (it may be negative, which
    crops the input).
  """
  slices, new_pad = [], []
  for size, k, s, d, (lo, hi) in zip(
    in_hw, kernel_hw, stride, dilation, padding, strict=True
  ):
    i0, i1, out = _live_taps(size, k, s, d, lo, hi)
    k2 = i1 - i0 + 1
    lo2 = lo - i0 * d
    hi2 = (out - 1) * s + d * (k2 - 1) + 1 - size - lo2
    slices.append(slice(i0, i1 + 1))
    new_pad.append((lo2, hi2))
  return tuple(slices), tuple(new_pad)


def _pad(x: jax.Array, padding) -> jax.Array:
  (top, bottom), (left, right) = padding
  if (top, bottom, left, right) == (0, 0, 0, 0):
    return x
  zero = jnp.zeros((), x.dtype)
  config = ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
  return jax.lax.pad(x, zero, config)  # negative padding crops


def _tap_slices(xp, kh, kw, out_hw, stride, dilation):
  """Yields `(i, j, x_tap)` with `x_tap` `[B, Ho, Wo, C]` for each tap."""
  (oh, ow), (sh, sw), (dh, dw) = out_hw, stride, dilation
  b, _, _, c = xp.shape
  for i in range(kh):
    for j in range(kw):
      start = (0, i * dh, j * dw, 0)
      limit = (b, i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c)
      yield i, j, jax.lax.slice(xp, start, limit, (1, sh, sw, 1))


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


def _einsum_matmul(x, w):
  return jnp.einsum('bhwc,cd->bhwd', x, w)


@jax.custom_vjp
def _matmul_2d_weight_grad(x, w):
  return _einsum_matmul(x, w)


def _matmul_2d_weight_grad_fwd(x, w):
  return _einsum_matmul(x, w), (x, w)


def _matmul_2d_weight_grad_bwd(res, g):
  x, w = res
  k, n = w.shape
  dx = jnp.einsum('bhwd,cd->bhwc', g, w)
  # The weight gradient as a 2-D product contracting the leading axis of
  # both operands, which XLA:CPU runs in its own dot emitter without moving
  # either operand. Autodiff's 4-D contraction is canonicalised to
  # [M, K] x [K, N] instead, and XLA transposes an operand in memory inside
  # the fusion that produces it, with strided reads of every input of that
  # fusion (docs/benchmarks.md has the profiles and the gain).
  dw = jnp.einsum('mk,mn->kn', x.reshape(-1, k), g.reshape(-1, n))
  return dx, dw


_matmul_2d_weight_grad.defvjp(
  _matmul_2d_weight_grad_fwd, _matmul_2d_weight_grad_bwd
)


def _matmul(x, w):
  """`[B, ..., K] @ [K, N]`, at least 4-D (see `_matmul_2d_weight_grad`)."""
  k, n = w.shape
  lead = x.shape[:-1]
  # The custom VJP is written for [B, H, W, K]; the batch axis stays apart
  # so that a batch-sharded input keeps its sharding.
  if x.ndim > 4:
    x = x.reshape(x.shape[0], 1, -1, k)
  if jax.default_backend() == 'cpu':
    y = _matmul_2d_weight_grad(x, w)
  else:
    y = _einsum_matmul(x, w)
  return y.reshape(lead + (n,))


def _im2col(x, kernel, stride, dilation, padding, out_hw):
  kh, kw, cin, cout = kernel.shape
  xp = _pad(x, padding)
  taps = [t for _, _, t in _tap_slices(xp, kh, kw, out_hw, stride, dilation)]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return _matmul(patches, kernel.reshape(kh * kw * cin, cout))


def _tap_region(size, out, k_index, s, d, lo):
  """Outputs `[o0, o1)` whose tap `k_index` reads real input, and the first
  input index read. Output `o` reads `o * s + k_index * d - lo`."""
  first = k_index * d - lo
  o0 = max(0, -(first // s))  # ceil(-first / s), the first read >= 0
  o1 = min(out, (size - 1 - first) // s + 1)
  return o0, max(o0, o1), o0 * s + first


def _depthwise(x, kernel, stride, dilation, padding, out_hw):
  """Depthwise convolution as a sum of per-tap elementwise products."""
  kh, kw = kernel.shape[:2]
  xp = _pad(x, padding)
  out = None
  for i, j, t in _tap_slices(xp, kh, kw, out_hw, stride, dilation):
    y = t * kernel[i, j, 0]
    out = y if out is None else out + y
  return out


def live_taps_per_output(in_hw, kernel_hw, stride, dilation, padding) -> float:
  """Mean number of kernel taps per output that read real input."""
  mean = 1.0
  for size, k, s, d, (lo, hi) in zip(
    in_hw, kernel_hw, stride, dilation, padding, strict=True
  ):
    out = _conv_out_size(size, k, s, d, lo, hi)
    reach = [_tap_region(size, out, i, s, d, lo) for i in range(k)]
    mean *= sum(o1 - o0 for o0, o1, _ in reach) / out
  return mean


def _per_tap(x, kernel, stride, dilation, padding, out_hw):
  """Sum over kernel taps of (input slice) @ (tap weights).

  Each tap is computed only on the outputs where it reads real input, from
  an unpadded slice of `x`, and padded into place: with a dilation that is
  large next to the map (ASPP), most taps lie partly in the padding, and
  their zeros are neither gathered nor multiplied (exact). (For depthwise
  convolutions the same restriction made XLA:CPU's forward + backward
  slower: `_depthwise` keeps whole padded taps.)
  """
  kh, kw = kernel.shape[:2]
  (sh, sw), (dh, dw), ((top, _), (left, _)) = stride, dilation, padding
  b, h, w, c = x.shape
  out = None
  for i in range(kh):
    r0, r1, hi0 = _tap_region(h, out_hw[0], i, sh, dh, top)
    for j in range(kw):
      c0, c1, wi0 = _tap_region(w, out_hw[1], j, sw, dw, left)
      if r1 == r0 or c1 == c0:
        continue
      start = (0, hi0, wi0, 0)
      limit = (b, hi0 + (r1 - r0 - 1) * sh + 1, wi0 + (c1 - c0 - 1) * sw + 1, c)
      y = _matmul(jax.lax.slice(x, start, limit, (1, sh, sw, 1)), kernel[i, j])
      config = (
        (0, 0, 0),
        (r0, out_hw[0] - r1, 0),
        (c0, out_hw[1] - c1, 0),
        (0, 0, 0),
      )
      y = jax.lax.pad(y, jnp.zeros((), y.dtype), config)
      out = y if out is None else out + y
  return out


# Winograd's minimal filtering F(2, 3) (Lavin & Gray, "Fast Algorithms for
# Convolutional Neural Networks", CVPR 2016): 2 outputs of a 3-tap filter
# from 4 inputs with 4 multiplies instead of 6, i.e. 16 instead of 36 per
# 2x2 output tile in 2-D. All coefficients are 0, +-1 or +-1/2, so the
# transforms round no worse than a re-ordered sum.
def _winograd_filter(k):
  """`G k` for the 3 taps of a filter: its 4 transformed taps."""
  k0, k1, k2 = k
  return [k0, (k0 + k1 + k2) * 0.5, (k0 - k1 + k2) * 0.5, k2]


def _winograd_in(r):
  """`B^T r` for the 4 input rows of a tile."""
  r0, r1, r2, r3 = r
  return [r0 - r2, r1 + r2, r2 - r1, r1 - r3]


def _winograd_out(m):
  """`A^T m`: the tile's 2 outputs from its 4 products."""
  m0, m1, m2, m3 = m
  return [m0 + m1 + m2, m1 - m2 - m3]


def _winograd_rows(xp, axis: int, d: int, tiles: int):
  """The 4 input rows of every tile along `axis`, each `[.., tiles, d, ..]`.

  With dilation `d`, the tile `t` of phase `p` (`0 <= p < d`) computes
  outputs `2dt + p` and `2dt + p + d` from inputs `2dt + p + a d`,
  `a = 0..3`: seen as `[tiles + 1, 2, d]`, input `a` of every tile is one
  plain slice, so no gather is needed and the phases stay interleaved.
  """
  p = xp.reshape(xp.shape[:axis] + (tiles + 1, 2, d) + xp.shape[axis + 1 :])

  def row(a):
    index = [slice(None)] * p.ndim
    index[axis] = slice(a // 2, a // 2 + tiles)
    index[axis + 1] = a % 2
    return p[tuple(index)]

  return [row(a) for a in range(4)]


def _winograd_in_transposed(d):
  """`B d`, the transpose of `_winograd_in`."""
  d0, d1, d2, d3 = d
  return [d0, d1 - d2 + d3, d1 + d2 - d0, -d3]


def _winograd_overlap_add(rows, axis: int):
  """The transpose of `_winograd_rows`: adds each tile's 4 rows back where
  they were read (neighbouring tiles share 2)."""
  zero_tile = [(0, 0)] * rows[0].ndim

  def shifted(r, lo, hi):
    pads = list(zero_tile)
    pads[axis] = (lo, hi)
    return jnp.pad(r, pads)

  pairs = [
    shifted(rows[e], 0, 1) + shifted(rows[2 + e], 1, 0) for e in range(2)
  ]
  y = jnp.stack(pairs, axis=axis + 1)  # [.., tiles + 1, 2, d, ..]
  shape = y.shape
  return y.reshape(shape[:axis] + (-1,) + shape[axis + 3 :])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _winograd_input(xp, tiling):
  """`B^T x B` of every (dilated) 4x4 input tile: 16 arrays
  `[b, th, dh, tw, dw, c]`, element `4 a + b` of each tile."""
  dh, th, dw, tw = tiling
  inputs = []
  for v in _winograd_in(_winograd_rows(xp, 1, dh, th)):
    inputs.extend(_winograd_in(_winograd_rows(v, 3, dw, tw)))
  return tuple(inputs)


def _winograd_input_fwd(xp, tiling):
  return _winograd_input(xp, tiling), None


def _winograd_input_bwd(tiling, _, dv):
  # Written by hand: autodiff's transpose pads every one of the 64 slices
  # back to the full input and adds them, a large share of a training
  # step's op time on XLA:CPU.
  cols = [
    _winograd_overlap_add(_winograd_in_transposed(dv[4 * a : 4 * a + 4]), 3)
    for a in range(4)
  ]
  return (_winograd_overlap_add(_winograd_in_transposed(cols), 1),)


_winograd_input.defvjp(_winograd_input_fwd, _winograd_input_bwd)


def _winograd(x, kernel, dilation, padding, out_hw):
  """3x3 stride-1 convolution, any dilation, as 16 matmuls on 2x2 tiles."""
  b, h, w, _ = x.shape
  (dh, dw), (oh, ow), ((top, _), (left, _)) = dilation, out_hw, padding
  th, tw = -(-oh // (2 * dh)), -(-ow // (2 * dw))
  # Pad to whole tiles: the extra outputs are computed and cropped.
  xp = _pad(
    x,
    ((top, 2 * dh * (th + 1) - h - top), (left, 2 * dw * (tw + 1) - w - left)),
  )
  inputs = _winograd_input(xp, (dh, th, dw, tw))
  # G k G^T written out: as an einsum, XLA:CPU runs it as matmuls with K=3
  # over the whole kernel, memory-bound and measurably slow.
  kg = [_winograd_filter(list(kernel[i])) for i in range(3)]  # kg[i][b]
  u = [_winograd_filter([kg[i][b] for i in range(3)]) for b in range(4)]
  # One matmul per tile element: a batched matmul would need the 16 inputs
  # concatenated into one buffer first (an extra copy on XLA:CPU).
  prods = [_matmul(v, u[t % 4][t // 4]) for t, v in enumerate(inputs)]
  y = _winograd_output(tuple(prods))
  return y[:, :oh, :ow]


def _winograd_tiles_to_image(prods):
  """`A^T m A` of every tile: the 16 products `[b, th, dh, tw, dw, n]` to
  `[b, 2 dh th, 2 dw tw, n]` outputs."""
  b, th, dh, tw, dw, n = prods[0].shape
  rows = [_winograd_out(prods[4 * a : 4 * a + 4]) for a in range(4)]
  tiles = [
    [_winograd_out([rows[a][ew] for a in range(4)])[eh] for ew in range(2)]
    for eh in range(2)
  ]
  y = jnp.stack([jnp.stack(r) for r in tiles])  # [2, 2, b, th, dh, tw, dw, n]
  y = y.transpose(2, 3, 0, 4, 5, 1, 6, 7)
  return y.reshape(b, 2 * dh * th, 2 * dw * tw, n)


# A^T as a matrix, from `_winograd_out` itself; and `A^T (x) A^T`, which
# maps a tile's 16 products to its 4 outputs (rows `2 e + f`).
_WINOGRAD_AT = np.stack(_winograd_out(list(np.eye(4, dtype=np.float32))))
_WINOGRAD_AT2 = np.kron(_WINOGRAD_AT, _WINOGRAD_AT)


@jax.custom_vjp
def _winograd_output(prods):
  return _winograd_tiles_to_image(prods)


def _winograd_output_fwd(prods):
  return _winograd_tiles_to_image(prods), prods[0].shape


def _winograd_output_bwd(shape, g):
  # The 16 product gradients as one [16, 4] x [4, tiles * n] matmul, whose
  # rows are each product's gradient, contiguous. Written elementwise,
  # XLA:CPU fuses the producer of `g` (BatchNorm's backward, say) into each
  # of the 16 consumers and recomputes it there; as an einsum over the tile
  # axes, every product's slice is copied out with a transpose.
  b, th, dh, tw, dw, n = shape
  g = g.reshape(b, th, 2, dh, tw, 2, dw, n).transpose(2, 5, 0, 1, 3, 4, 6, 7)
  dm = jnp.einsum(
    'ek,em->km',
    jnp.asarray(_WINOGRAD_AT2, g.dtype),
    g.reshape(4, -1),
    precision=jax.lax.Precision.HIGHEST,
  )
  return (tuple(dm[t].reshape(shape) for t in range(16)),)


_winograd_output.defvjp(_winograd_output_fwd, _winograd_output_bwd)


# Above this share of padded-tile work Winograd's 2.25x fewer multiplies no
# longer pay for its transforms (docs/benchmarks.md).
WINOGRAD_MAX_WASTE = 1.5
# Per-tap matmuls restricted to the outputs each tap reaches need no patch
# buffer and no transforms: on XLA:CPU they beat Winograd wherever they
# need at most this many times its multiplies (counting Winograd's padded
# tiles), and im2col wherever they skip a fifth of its multiplies
# (docs/benchmarks.md, per-layer table).
TAPS_OVER_WINOGRAD = 1.4
TAPS_OVER_IM2COL = 0.8
# Forward pass alone (inference), Winograd stays faster up to a smaller
# margin than with the backward pass (measurements: docs/benchmarks.md).
TAPS_OVER_WINOGRAD_FORWARD = 1.2


def _winograd_waste(out_hw: Sequence[int], dilation) -> float:
  """Outputs computed in whole `2 d` tiles over outputs needed."""
  waste = 1.0
  for o, d in zip(out_hw, pair(dilation), strict=True):
    waste *= -(-o // (2 * d)) * 2 * d / o
  return waste


def choose_lowering(
  kernel_shape: Sequence[int],
  groups: int,
  backend: str | None = None,
  dilation: int | Sequence[int] = 1,
  stride: int | Sequence[int] = 1,
  dtype=jnp.float32,
  out_hw: Sequence[int] | None = None,
  live_taps: float | None = None,
  forward_only: bool = False,
) -> str:
  """The lowering `'auto'` resolves to, from static shapes and the backend.

  On XLA:CPU a dense convolution runs faster as one matmul over gathered
  patches than natively, a 3x3 stride-1 one (dilated or not) in float32
  faster still with Winograd's F(2x2, 3x3) (2.25x fewer multiplies, 4x
  instead of 9x the input in buffers), and a depthwise one as a sum of
  per-tap multiplies. Where a dilation is large next to the map
  (ASPP), many taps read padding for part of the outputs: one matmul per
  tap on just the outputs it reaches (`'taps'`) then does the fewest
  multiplies and trains fastest (`live_taps`, the mean
  number of taps per output that read real input, from
  `live_taps_per_output`; `TAPS_OVER_WINOGRAD`, `TAPS_OVER_IM2COL`).
  GPUs and TPUs keep their native convolutions (cuDNN, the TPU MXU path),
  except dense dilated ones on GPU: cuDNN's kernels for their weight
  gradient are slow, and one matmul over patches is faster there. The
  figures behind each rule are in docs/benchmarks.md.
  `kernel_shape` and `dilation` are those left after padding-only taps are
  pruned. Winograd computes whole tiles of `2 d` outputs per dimension:
  where rounding `out_hw` up to them wastes more than `WINOGRAD_MAX_WASTE`
  of the work (large dilations on small maps), it is not used.
  `forward_only` (no gradient will be taken: inference) picks the fastest
  forward pass instead of the fastest training step
  (`TAPS_OVER_WINOGRAD_FORWARD`).
  """
  backend = backend or jax.default_backend()
  kh, kw, cin_per_group, cout = kernel_shape
  if groups > 1:
    depthwise = cin_per_group == 1 and cout == groups
    return 'taps' if backend == 'cpu' and depthwise else 'native'
  if backend == 'cpu':
    winograd = (kh, kw) == (3, 3) and pair(stride) == (1, 1)
    winograd = winograd and dtype == jnp.float32
    waste = _winograd_waste(out_hw, dilation) if out_hw is not None else 1.0
    if live_taps is not None and (kh, kw) != (1, 1):
      limit = kh * kw * TAPS_OVER_IM2COL
      if winograd:
        ratio = (
          TAPS_OVER_WINOGRAD_FORWARD if forward_only else TAPS_OVER_WINOGRAD
        )
        limit = min(limit, 4 * waste * ratio)
      if live_taps <= limit:
        return 'taps'
    return 'winograd' if winograd and waste <= WINOGRAD_MAX_WASTE else 'im2col'
  dh, dw = pair(dilation)
  dilated = (kh > 1 and dh > 1) or (kw > 1 and dw > 1)
  return 'im2col' if backend == 'gpu' and dilated else 'native'


def conv2d(
  x: jax.Array,
  kernel: jax.Array,
  *,
  stride: int | Sequence[int] = 1,
  dilation: int | Sequence[int] = 1,
  padding: int | Sequence[int] | None = None,
  groups: int = 1,
  lowering: str = 'auto',
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
    prune: drop kernel taps that can only read padding (exact).
    forward_only: no gradient will be taken (inference): `'auto'` picks the
      fastest forward pass rather than the fastest training step.

  Returns:
    `[B, Ho, Wo, C_out]`, with `Ho = (H + 2 ph - dh (kh - 1) - 1) // sh + 1`.
  """
  if lowering not in LOWERINGS:
    raise ValueError(f'unknown conv lowering {lowering!r}; one of {LOWERINGS}')
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
    _conv_out_size(n, k, s, d, lo, hi)
    for n, k, s, d, (lo, hi) in zip(
      in_hw, (kh, kw), stride, dilation, pads, strict=True
    )
  )
  if lowering == 'auto':
    lowering = choose_lowering(
      kernel.shape,
      groups,
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
    return _depthwise(x, kernel, stride, dilation, pads, out_hw)
  if lowering == 'winograd' and (kh, kw) == (3, 3) and stride == (1, 1):
    return _winograd(x, kernel, dilation, pads, out_hw)
  if (kh, kw) == (1, 1) or lowering in ('im2col', 'winograd'):
    return _im2col(x, kernel, stride, dilation, pads, out_hw)
  return _per_tap(x, kernel, stride, dilation, pads, out_hw)


def _divide_by_one(x):
  # `1 + 0 * x` is 1 for every finite x, and XLA does not fold `0 * x` for
  # floats, so this is an exact identity (non-finite values become NaN)
  # whose root is a division, which XLA will not duplicate into consumers.
  return x / (1 + 0 * x)


@jax.custom_vjp
def _fusion_barrier(x):
  return _divide_by_one(x)


def _fusion_barrier_fwd(x):
  return _divide_by_one(x), None


def _fusion_barrier_bwd(_, g):
  # The gradient of a residual stream is a chain of adds too.
  return (_divide_by_one(g),)


_fusion_barrier.defvjp(_fusion_barrier_fwd, _fusion_barrier_bwd)


def fusion_barrier(x: jax.Array) -> jax.Array:
  """`x`, unchanged, that XLA:CPU computes once instead of inside each
  consumer (and likewise its gradient).

  XLA:CPU duplicates cheap elementwise producers into every elementwise
  consumer. A residual stream (`out_k = relu(z_k + out_{k-1})`) is such a
  chain: each block's output fusion recomputed the whole stream back to the
  stage's first block, O(L^2) elementwise work. Ending the block with a
  division by one stops it (XLA does not duplicate divisions; the
  measurements are in docs/benchmarks.md). Other backends get `x` itself.
  """
  if jax.default_backend() != 'cpu':
    return x
  return _fusion_barrier(x)
