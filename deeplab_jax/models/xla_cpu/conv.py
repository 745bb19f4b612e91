"""Convolutions lowered for XLA:CPU, and the rule that picks one.

XLA's native CPU convolution reaches about half the matmul peak, so on CPU
a convolution runs as matmuls: one over gathered patches (im2col,
`conv_lowering.im2col` with `matmul` here), one per kernel tap on just the
outputs it reaches (`per_tap`), Winograd's minimal filtering (`winograd`),
or, depthwise, a sum of per-tap products (`depthwise`). The weight gradient
of every matmul has its own form (`matmul`'s custom VJP). All give PyTorch's
numbers up to float rounding; which is fastest depends on the shapes
(`choose_lowering`, thresholds measured in docs/benchmarks.md). Chosen only
for programs whose target platform is `'cpu'`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deeplab_jax.models import conv_geometry as geometry


def einsum_matmul(x, w):
  """`[B, H, W, K] @ [K, N]` with autodiff's own gradient."""
  return jnp.einsum('bhwc,cd->bhwd', x, w)


@jax.custom_vjp
def _matmul_2d_weight_grad(x, w):
  return einsum_matmul(x, w)


def _matmul_2d_weight_grad_fwd(x, w):
  return einsum_matmul(x, w), (x, w)


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


def matmul(x, w):
  """`[B, ..., K] @ [K, N]`, at least 4-D (see `_matmul_2d_weight_grad`)."""
  k, n = w.shape
  lead = x.shape[:-1]
  # The custom VJP is written for [B, H, W, K]; the batch axis stays apart
  # so that a batch-sharded input keeps its sharding.
  if x.ndim > 4:
    x = x.reshape(x.shape[0], 1, -1, k)
  return _matmul_2d_weight_grad(x, w).reshape(lead + (n,))


def depthwise(x, kernel, stride, dilation, padding, out_hw):
  """Depthwise convolution as a sum of per-tap elementwise products."""
  kh, kw = kernel.shape[:2]
  xp = geometry.pad(x, padding)
  out = None
  for i, j, t in geometry.tap_slices(xp, kh, kw, out_hw, stride, dilation):
    y = t * kernel[i, j, 0]
    out = y if out is None else out + y
  return out


def per_tap(x, kernel, stride, dilation, padding, out_hw):
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
    r0, r1, hi0 = geometry.tap_region(h, out_hw[0], i, sh, dh, top)
    for j in range(kw):
      c0, c1, wi0 = geometry.tap_region(w, out_hw[1], j, sw, dw, left)
      if r1 == r0 or c1 == c0:
        continue
      start = (0, hi0, wi0, 0)
      limit = (b, hi0 + (r1 - r0 - 1) * sh + 1, wi0 + (c1 - c0 - 1) * sw + 1, c)
      y = matmul(jax.lax.slice(x, start, limit, (1, sh, sw, 1)), kernel[i, j])
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


def winograd(x, kernel, dilation, padding, out_hw):
  """3x3 stride-1 convolution, any dilation, as 16 matmuls on 2x2 tiles."""
  b, h, w, _ = x.shape
  (dh, dw), (oh, ow), ((top, _), (left, _)) = dilation, out_hw, padding
  th, tw = -(-oh // (2 * dh)), -(-ow // (2 * dw))
  # Pad to whole tiles: the extra outputs are computed and cropped.
  xp = geometry.pad(
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
  prods = [matmul(v, u[t % 4][t // 4]) for t, v in enumerate(inputs)]
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
  for o, d in zip(out_hw, geometry.pair(dilation), strict=True):
    waste *= -(-o // (2 * d)) * 2 * d / o
  return waste


def choose_lowering(
  kernel_shape: Sequence[int],
  groups: int,
  *,
  stride: int | Sequence[int] = 1,
  dilation: int | Sequence[int] = 1,
  dtype=jnp.float32,
  out_hw: Sequence[int] | None = None,
  live_taps: float | None = None,
  forward_only: bool = False,
) -> str:
  """The fastest XLA:CPU lowering of a convolution, from static shapes.

  A dense convolution runs faster as one matmul over gathered patches than
  natively, a 3x3 stride-1 one (dilated or not) in float32 faster still
  with Winograd's F(2x2, 3x3) (2.25x fewer multiplies, 4x instead of 9x the
  input in buffers), and a depthwise one as a sum of per-tap multiplies.
  Where a dilation is large next to the map (ASPP), many taps read padding
  for part of the outputs: one matmul per tap on just the outputs it
  reaches (`'taps'`) then does the fewest multiplies and trains fastest
  (`live_taps`, the mean number of taps per output that read real input,
  from `conv_geometry.live_taps_per_output`; `TAPS_OVER_WINOGRAD`,
  `TAPS_OVER_IM2COL`). Winograd computes whole tiles of `2 d` outputs per
  dimension: where rounding `out_hw` up to them wastes more than
  `WINOGRAD_MAX_WASTE` of the work, it is not used. `forward_only` (no
  gradient will be taken: inference) picks the fastest forward pass
  (`TAPS_OVER_WINOGRAD_FORWARD`). `kernel_shape` and `dilation` are those
  left after padding-only taps are pruned.
  """
  kh, kw, cin_per_group, cout = kernel_shape
  if groups > 1:
    depthwise = cin_per_group == 1 and cout == groups
    return 'taps' if depthwise else 'native'
  winograd = (kh, kw) == (3, 3) and geometry.pair(stride) == (1, 1)
  winograd = winograd and dtype == jnp.float32
  waste = _winograd_waste(out_hw, dilation) if out_hw is not None else 1.0
  if live_taps is not None and (kh, kw) != (1, 1):
    limit = kh * kw * TAPS_OVER_IM2COL
    if winograd:
      ratio = TAPS_OVER_WINOGRAD_FORWARD if forward_only else TAPS_OVER_WINOGRAD
      limit = min(limit, 4 * waste * ratio)
    if live_taps <= limit:
      return 'taps'
  return 'winograd' if winograd and waste <= WINOGRAD_MAX_WASTE else 'im2col'
