"""The traffic analyzer on small TPU programs (v5e, compiled by libtpu and
kept in tests/fixtures/tpu_hlo/ by `python -m tests.tpu_fixtures`), each
against bytes counted here by hand, and against XLA's own `bytes
accessed` where both count the same thing.

How the TPU stores these arrays (the layouts in the HLO): float32 in
`T(8,128)` tiles (the two most minor dimensions padded to multiples of 8
and 128), scalars `s32[]{:T(128)}` padded to 128 elements (512 bytes),
`pred[]{:T(512)}` to 512. Where XLA's count differs by design, the test
says why and checks the difference by hand:

- An asynchronous copy or collective (`copy-start` / `-done`, the
  memory-space assignment's prefetches into on-chip memory): the
  hardware reads the array once and writes it once. XLA counts the start's
  whole tuple result (the destination, and the source it echoes) and the
  done's result besides: the array twice more, and 4 KiB per context word
  of the start's tuple plus 512 bytes.
- An asynchronous slice (`slice-start`, a prefetch of part of an
  array): the hardware reads the slice and writes it on chip; XLA counts
  the slice once more and 512 bytes, and nothing for the `ConcatBitcast`
  that joins the slices.
- A loop: XLA counts its body once; the analyzer once per iteration.
"""

import json
import os

import pytest

from deeplab_jax.planning import traffic

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'tpu_hlo')
MiB = 2**20
SCALAR = 512  # s32[]{:T(128)} and pred[]{:T(512)} as laid out

with open(os.path.join(FIXTURES, 'xla_counts.json')) as f:
  XLA = json.load(f)


def _ops(name):
  with open(os.path.join(FIXTURES, f'{name}.hlo.txt')) as f:
    return traffic.traffic(f.read(), root='tests')


def _total(ops, padded=True):
  if padded:
    return sum(o.padded_hbm_bytes + o.padded_on_chip_bytes for o in ops)
  return sum(o.hbm_bytes + o.on_chip_bytes for o in ops)


def _prefetch_extra(array_bytes, context_words=1):
  """What XLA adds to the bytes moved for one asynchronous pair."""
  return 2 * array_bytes + 4096 * context_words + 512


# name: (bytes moved, counted by hand; XLA's count, from the same terms)
ARRAY_8x64x64x48 = 8 * 64 * 48 * 128 * 4  # the width 64 padded to 128
X_8x64x64x128 = 8 * 64 * 64 * 128 * 4  # 16 MiB, no padding
X_8x32x32x128 = 8 * 32 * 32 * 128 * 4  # 4 MiB
W_3x3x128x128 = 3 * 3 * 128 * 128 * 4
A_512x256, B_256x384, C_512x384 = 512 * 256 * 4, 256 * 384 * 4, 512 * 384 * 4
ROWS_8x256x128 = 8 * 256 * 128 * 4  # 1 MiB
INDEX_ARITHMETIC = 13 * SCALAR  # copy 2, add 3, compare 3, select 4, use 1
CARRY, W_BF16 = 256 * 512 * 4, 512 * 512 * 2  # the scan's carry, a layer
SHARD = 256 * 512 * 4  # each collective's shard per chip

HAND = {
  # In and out, each 8 x 64 x 48 x 128 floats as laid out.
  'elementwise': (2 * ARRAY_8x64x64x48, 2 * ARRAY_8x64x64x48),
  # x prefetched into on-chip memory (read, written), reduced from there;
  # the scalar init and the 128 sums.
  'reduction': (
    3 * X_8x64x64x128 + 2 * SCALAR,
    3 * X_8x64x64x128 + 2 * SCALAR + _prefetch_extra(X_8x64x64x128),
  ),
  # The kernel prefetched; the convolution reads it and x, writes on chip;
  # a copy moves the result to HBM in the output's layout.
  'convolution': (
    3 * W_3x3x128x128 + 4 * X_8x32x32x128,
    3 * W_3x3x128x128 + 4 * X_8x32x32x128 + _prefetch_extra(W_3x3x128x128),
  ),
  'dot': (
    3 * A_512x256 + B_256x384 + C_512x384,
    3 * A_512x256 + B_256x384 + C_512x384 + _prefetch_extra(A_512x256),
  ),
  'concatenate': (4 * X_8x32x32x128, 4 * X_8x32x32x128),
  # In place: the update is read and written; the 8 MiB buffer is neither.
  'dynamic_update_slice': (
    2 * ROWS_8x256x128 + INDEX_ARITHMETIC,
    2 * ROWS_8x256x128 + INDEX_ARITHMETIC,
  ),
  # In place, reading the rows it overwrites: read once, written once.
  'update_reading_itself': (
    2 * ROWS_8x256x128 + INDEX_ARITHMETIC,
    2 * ROWS_8x256x128 + INDEX_ARITHMETIC,
  ),
  'all_reduce': (2 * SHARD, 2 * SHARD),
  # The shard in, the gathered 4 shards out on chip, copied to HBM.
  'all_gather': (SHARD + 3 * 4 * SHARD, SHARD + 3 * 4 * SHARD),
  # Sent, received on chip, copied to HBM (two context words).
  'collective_permute': (4 * SHARD, 4 * SHARD + _prefetch_extra(SHARD, 2)),
}


@pytest.mark.parametrize('name', sorted(HAND))
def test_bytes_as_laid_out_against_a_hand_count_and_xla(name):
  moved, xla = HAND[name]
  assert _total(_ops(name)) == moved
  assert XLA[name]['bytes_accessed'] == pytest.approx(xla, rel=0.01)


def test_padding_is_counted_and_reported_apart():
  ops = _ops('elementwise')
  # The logical bytes: 8 x 64 x 64 x 48 floats in and out.
  assert _total(ops, padded=False) == 2 * 8 * 64 * 64 * 48 * 4
  assert _total(ops) == 2 * _total(ops, padded=False)
  (row,) = traffic.summarise(ops, ('kind',))
  assert row['padded_hbm_bytes'] == 2 * row['hbm_bytes']


def test_a_scan_counts_its_body_per_iteration_and_xla_once():
  # Before the loop: the counter's copy; x prefetched; the six layers'
  # weights converted to bfloat16 (6 x 512 x 512 floats read, bfloat16
  # written). After it: the result copied back. Each of the 6 iterations:
  # the counter's copy and increment, the carry copied, and the layer
  # (the carry, its bfloat16 weights and the index read, the carry written).
  before = 2 * SCALAR + 2 * CARRY + 6 * 512 * 512 * (4 + 2)
  after = 2 * CARRY
  body = 2 * SCALAR + 3 * SCALAR + 2 * CARRY + (CARRY + W_BF16 + SCALAR + CARRY)
  ops = _ops('scan')
  assert _total(ops) == before + 6 * body + after
  assert {o.repeats for o in ops if o.kind == 'convolution'} == {6}
  xla = before + body + after + 2 * _prefetch_extra(CARRY)
  assert XLA['scan']['bytes_accessed'] == pytest.approx(xla, rel=0.01)
  # 6 layers of a 256 x 512 by 512 x 512 product.
  assert sum(o.flops for o in ops) == 6 * 2 * 256 * 512 * 512


def test_a_sliced_prefetch_moves_each_slice_once():
  # The 3 x 3 x 512 x 128 float32 kernel (no padding) prefetched as its
  # three rows: each read from HBM and written on chip, once. The
  # `ConcatBitcast` that joins them reads the slices where they lie.
  row = 1 * 3 * 512 * 128 * 4
  ops = _ops('sliced_prefetch')
  starts = [o for o in ops if o.opcode == 'slice-start']
  assert len(starts) == 3
  for o in starts:
    assert (o.padded_hbm_bytes, o.padded_on_chip_bytes) == (row, row)
    assert o.xla_extra_bytes == row + 512
  assert 'custom-call' not in {o.opcode for o in ops}


def test_an_update_of_a_fresh_buffer_writes_only_the_update():
  # `fusion.8` gathers one of the 7 column taps of the stride-2 image into
  # a fresh bf16[512,8,66,3,7] buffer (`AllocateBuffer`, nothing to read):
  # layout {1,3,4,2,0:T(4,128)(2,1)} pads the 8 to 128 and the 3 to 4, so
  # the buffer is 512 x 66 x 7 x 4 x 128 x 2 bytes and one tap 1/7 of it.
  # It reads bf16[512,1,7,1,3] ({2,4,3,0,1}: 7 -> 128, 3 -> 4) and
  # bf16[512,1,8,65,3] (8 -> 128, 3 -> 4).
  tap = 512 * 66 * 4 * 128 * 2
  reads = 512 * 4 * 128 * 2 + 512 * 65 * 4 * 128 * 2
  (op,) = [o for o in _ops('fresh_buffer_update') if o.name == 'fusion.8']
  assert op.padded_hbm_bytes + op.padded_on_chip_bytes == reads + tap


def test_per_instruction_roofline_sums_each_instructions_bound():
  # On a hypothetical chip of 1 FLOP/s and 1 byte/s, each instruction takes
  # the larger of its FLOPs and bytes: the dot fusion is compute-bound
  # (2 x 512 x 256 x 384 FLOPs), the prefetch memory-bound.
  ops = _ops('dot')
  got = traffic.instruction_roofline_s(ops, 1.0, 1.0)
  fusion = 2 * 512 * 256 * 384
  prefetch_hbm = A_512x256  # its HBM read; the on-chip write is not HBM
  assert got == fusion + prefetch_hbm
  # The whole-step max(FLOPs, bytes) is below the sum of the bounds.
  total_flops = sum(o.flops for o in ops)
  total_hbm = sum(o.padded_hbm_bytes for o in ops)
  assert max(total_flops, total_hbm) < got


@pytest.mark.parametrize('name', sorted(XLA))
def test_xlas_count_is_the_analyzers_counted_xlas_way(name):
  """XLA's `bytes accessed`, explained: the analyzer's padded bytes at
  every memory level, each loop body once, and each asynchronous pair's
  echoed tuple, context words and done result (`xla_counted_bytes`)."""
  got = traffic.xla_counted_bytes(_ops(name))
  assert got == pytest.approx(XLA[name]['bytes_accessed'], rel=1e-3)
