"""The geometry of a PyTorch-style convolution: output sizes, which kernel
taps read real input, and the exact removal of taps that read only padding.

Every lowering (`conv_lowering`, `xla_cpu.conv`) computes from these; they
depend on static shapes only, never on the platform.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def pair(v: int | Sequence[int]) -> tuple[int, int]:
  """`(v, v)` for an int, else the two values as ints."""
  if isinstance(v, int):
    return (v, v)
  a, b = v
  return (int(a), int(b))


def conv_out_size(size: int, k: int, s: int, d: int, lo: int, hi: int):
  return (size + lo + hi - d * (k - 1) - 1) // s + 1


def _live_taps(size: int, k: int, s: int, d: int, lo: int, hi: int):
  """Returns the first and last kernel taps that read real input.

  Output `o` reads input index `o * s + i * d - lo` through tap `i`; a tap
  that never lands inside `[0, size)` multiplies padding only and can be
  dropped exactly. Live taps form a contiguous range because the read index
  grows with `i`.
  """
  out = conv_out_size(size, k, s, d, lo, hi)
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


def pad(x: jax.Array, padding) -> jax.Array:
  (top, bottom), (left, right) = padding
  if (top, bottom, left, right) == (0, 0, 0, 0):
    return x
  zero = jnp.zeros((), x.dtype)
  config = ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
  return jax.lax.pad(x, zero, config)  # negative padding crops


def tap_slices(xp, kh, kw, out_hw, stride, dilation):
  """Yields `(i, j, x_tap)` with `x_tap` `[B, Ho, Wo, C]` for each tap."""
  (oh, ow), (sh, sw), (dh, dw) = out_hw, stride, dilation
  b, _, _, c = xp.shape
  for i in range(kh):
    for j in range(kw):
      start = (0, i * dh, j * dw, 0)
      limit = (b, i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c)
      yield i, j, jax.lax.slice(xp, start, limit, (1, sh, sw, 1))


def tap_region(size, out, k_index, s, d, lo):
  """Outputs `[o0, o1)` whose tap `k_index` reads real input, and the first
  input index read. Output `o` reads `o * s + k_index * d - lo`."""
  first = k_index * d - lo
  o0 = max(0, -(first // s))  # ceil(-first / s), the first read >= 0
  o1 = min(out, (size - 1 - first) // s + 1)
  return o0, max(o0, o1), o0 * s + first


def live_taps_per_output(in_hw, kernel_hw, stride, dilation, padding) -> float:
  """Mean number of kernel taps per output that read real input."""
  mean = 1.0
  for size, k, s, d, (lo, hi) in zip(
    in_hw, kernel_hw, stride, dilation, padding, strict=True
  ):
    out = conv_out_size(size, k, s, d, lo, hi)
    reach = [tap_region(size, out, i, s, d, lo) for i in range(k)]
    mean *= sum(o1 - o0 for o0, o1, _ in reach) / out
  return mean
