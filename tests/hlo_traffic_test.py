"""`hlo_traffic` reads what each instruction of a compiled program reads
and writes, checked against the arrays' own sizes (NumPy), and names the
kind, direction and source line of each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeplab_jax.planning import chips, planner
from deeplab_jax.planning import traffic as hlo_traffic


def _conv_relu_sum(x, w):
  y = jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  return jnp.maximum(y, 0.0).sum(axis=(1, 2))


def _compiled_text(f, *args):
  return jax.jit(f).lower(*args).compile().as_text()


def test_bytes_are_what_each_instruction_reads_and_writes():
  x = np.ones((2, 16, 16, 8), np.float32)
  w = np.ones((3, 3, 8, 4), np.float32)
  ops = hlo_traffic.traffic(_compiled_text(_conv_relu_sum, x, w), root='tests')
  conv = [o for o in ops if o.kind == 'convolution']
  reduce = [o for o in ops if o.kind == 'reduce']
  assert len(conv) == 1 and len(reduce) == 1, ops
  y = np.zeros((2, 16, 16, 4), np.float32)  # the convolution's output
  out = np.zeros((2, 4), np.float32)
  assert conv[0].hbm_bytes == x.nbytes + w.nbytes + y.nbytes
  assert reduce[0].hbm_bytes == y.nbytes + out.nbytes
  assert {o.source for o in conv + reduce} == {
    'hlo_traffic_test.py:_conv_relu_sum'
  }
  assert all(o.direction == 'forward' and o.on_chip_bytes == 0 for o in ops)
  # 2 x multiply-adds over the taps that read the image: in each of the
  # two 16-wide dimensions 16 x 3 taps, less the 2 that fall on the 'SAME'
  # padding at the borders (46); 8 input and 4 output channels, batch 2.
  assert conv[0].flops == 2 * (2 * 4) * 46 * 46 * 8
  assert reduce[0].flops == 0


def test_matmul_and_grouped_convolution_flops():
  a, b = np.ones((4, 32, 16), np.float32), np.ones((4, 16, 8), np.float32)
  ops = hlo_traffic.traffic(_compiled_text(jnp.matmul, a, b))
  assert sum(o.flops for o in ops) == 2 * 4 * 32 * 8 * 16
  x = np.ones((2, 8, 8, 6), np.float32)
  w = np.ones((3, 3, 1, 6), np.float32)  # depthwise: 6 groups of 1

  def depthwise(x, w):
    return jax.lax.conv_general_dilated(
      x,
      w,
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=6,
    )

  ops = hlo_traffic.traffic(_compiled_text(depthwise, x, w))
  # 8 x 3 taps less 2 on the padding per dimension (22); one input channel
  # per output channel.
  assert sum(o.flops for o in ops) == 2 * (2 * 6) * 22 * 22 * 1


def test_gradient_instructions_are_backward():
  x = np.ones((2, 8, 8, 8), np.float32)
  w = np.ones((3, 3, 8, 4), np.float32)
  grad = jax.grad(lambda x, w: _conv_relu_sum(x, w).sum(), argnums=(0, 1))
  ops = hlo_traffic.traffic(_compiled_text(grad, x, w), root='tests')
  kinds = hlo_traffic.summarise(ops, ('kind', 'direction'))
  convs = {
    r['direction']: r['count'] for r in kinds if r['kind'] == 'convolution'
  }
  # One forward convolution; the input and weight gradients are
  # transposes (XLA:CPU may drop the metadata of one: `unmarked`).
  assert convs['forward'] == 1 and convs['backward'] >= 1, kinds
  assert convs['backward'] + convs.get('unmarked', 0) == 2, kinds


def test_memory_space_annotations_split_hbm_from_on_chip():
  shape = '(f32[8,128]{1,0:T(8,128)S(1)}, bf16[4]{0:T(256)}, u32[]{:S(2)})'
  assert hlo_traffic.array_bytes(shape) == (8.0, 8 * 128 * 4 + 4)


def test_a_scan_counts_its_body_once_per_iteration():
  x = np.ones((2, 8, 8, 4), np.float32)
  w = np.ones((5, 3, 3, 4, 4), np.float32)

  def layers(x, w):
    def layer(h, wi):
      h = jax.lax.conv_general_dilated(
        h, wi, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
      return jnp.tanh(h), None

    return jax.lax.scan(layer, x, w)[0]

  ops = hlo_traffic.traffic(_compiled_text(layers, x, w), root='tests')
  convs = [o for o in ops if o.kind == 'convolution']
  assert sum(o.repeats for o in convs) == 5, convs
  # Batch 2 x 4 out channels x (8 x 3 - 2 taps on the padding)^2 x 4 in
  # channels x 2 FLOPs, 5 times.
  assert sum(o.flops for o in convs) == 5 * 2 * (2 * 4) * 22 * 22 * 4
  # Each iteration reads its input (2 x 8 x 8 x 4 float32: 2048 bytes) and
  # one layer's kernel (3 x 3 x 4 x 4 float32: 576 bytes), and writes its
  # output (2048 bytes).
  assert sum(o.hbm_bytes for o in convs) == 5 * (2048 + 576 + 2048)
  # The planner marks such a program: XLA's cost analysis counts the body
  # once, so its columns are not the step's. The body's instructions are
  # the copy of the carry, the kernel's slice, the counter's increment, the
  # convolution and the tanh: 5; the same layers unrolled have none.
  breakdown = hlo_traffic.traffic_breakdown
  assert breakdown(_compiled_text(layers, x, w))['looped'] == 5

  def unrolled(x, w):
    for i in range(5):
      x = jnp.tanh(
        jax.lax.conv_general_dilated(
          x, w[i], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
        )
      )
    return x

  assert breakdown(_compiled_text(unrolled, x, w))['looped'] == 0


def test_a_scan_writes_each_stacked_output_in_place():
  xs = np.ones((6, 2, 64, 64), np.float32)

  def stacked(xs):
    def step(carry, x):
      y = jnp.tanh(x + carry)
      return carry + 1.0, y

    return jax.lax.scan(step, jnp.zeros((2, 64, 64)), xs)[1]

  ops = hlo_traffic.traffic(_compiled_text(stacked, xs), root='tests')
  loop = [o for o in ops if o.repeats == 6]
  assert loop, ops
  # Each iteration writes one slice of the stacked output in place and
  # reads one slice of `xs`: no instruction of the loop moves the whole
  # stacked buffer (xs.nbytes) per iteration.
  slice_bytes = xs[0].nbytes
  for o in loop:
    assert o.hbm_bytes / o.repeats <= 3 * slice_bytes + 64, o
  update = [o for o in loop if o.hbm_bytes / o.repeats >= 2 * slice_bytes]
  assert update, loop  # the fused slice, update and carry are counted


# Optimised-HLO lines as the TPU compiler writes its asynchronous
# collectives: a `-start` tuple holds operands, results and (for permutes)
# two context words.
_COLLECTIVES_HLO = """
  %ag = (f32[2,64]{1,0}, f32[8,64]{1,0}) all-gather-start(f32[2,64]{1,0} %p0), replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = f32[8,64]{1,0} all-gather-done((f32[2,64]{1,0}, f32[8,64]{1,0}) %ag)
  %cp = (f32[4,4]{1,0}, f32[4,4]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(f32[4,4]{1,0} %p1), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[4,4]{1,0} collective-permute-done((f32[4,4]{1,0}, f32[4,4]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) %cp)
  %ar = (f32[1024]{0}, bf16[512]{0}) all-reduce-start(f32[1024]{0} %p2, bf16[512]{0} %p3), to_apply=%add
  %ard = (f32[1024]{0}, bf16[512]{0}) all-reduce-done((f32[1024]{0}, bf16[512]{0}) %ar)
  %ar2 = f32[16]{0} all-reduce(f32[16]{0} %p4), to_apply=%add
"""  # noqa: E501 (HLO lines as the compiler writes them)


def test_collectives_count_each_result_once():
  got = hlo_traffic.collectives(_COLLECTIVES_HLO)
  assert got == {
    # The gathered result, 8 x 64 float32: not the shard beside it.
    'all-gather': {'count': 1, 'bytes': 8 * 64 * 4},
    # The received block, 4 x 4 float32: not the sent one, not the context.
    'collective-permute': {'count': 1, 'bytes': 4 * 4 * 4},
    # A combined all-reduce of two arrays (1024 float32 and 512 bfloat16),
    # and a synchronous one of 16 float32.
    'all-reduce': {'count': 2, 'bytes': 1024 * 4 + 512 * 2 + 16 * 4},
  }
  assert hlo_traffic.collective_shapes(_COLLECTIVES_HLO, 'all-gather') == [
    'f32[8,64]{1,0}'
  ]


def test_roofline_from_a_data_sheet():
  # v5e: 197 TFLOP/s bf16 and 819 GB/s per chip (cloud.google.com/tpu/
  # docs/v5e). 0.394 TFLOP take 2 ms; 4.095 GB take 5 ms: memory-bound,
  # and the MFU ceiling is 2 / 5.
  v5e = chips.CHIPS['TPU v5 lite']
  r = planner.roofline(0.394e12, 4.095e9, v5e)
  assert r == pytest.approx(
    {'compute_ms': 2.0, 'memory_ms': 5.0, 'step_ms': 5.0, 'mfu': 0.4}
  )
  assert planner.roofline(0.0, 0.0, v5e)['mfu'] == 0.0


_SCATTER_HLO = """
ENTRY %main (buf: f32[1024,128], idx: s32[16,1], upd: f32[16,128]) -> f32[1024,128] {
  %buf = f32[1024,128]{1,0} parameter(0)
  %idx = s32[16,1]{1,0} parameter(1)
  %upd = f32[16,128]{1,0} parameter(2)
  ROOT %scatter = f32[1024,128]{1,0} scatter(%buf, %idx, %upd), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}
"""  # noqa: E501 (HLO as the compiler writes it)


def test_a_scatter_in_place_moves_its_rows_not_its_buffer():
  (op,) = hlo_traffic.traffic(_SCATTER_HLO)
  # 16 rows of 128 floats (8 KiB) read from the buffer to combine, the
  # updates read, the rows written; the 16 indices read. The 512 KiB
  # buffer is neither read nor written whole.
  rows = 16 * 128 * 4
  assert op.hbm_bytes == rows + rows + rows + 16 * 4


def test_taps_on_padding_are_not_counted():
  # As XLA's TPU compiler writes a 1x1 weight gradient in bfloat16: one
  # input position, a 128-tap window over 127 padded zeros on each side,
  # so each of the 128 outputs reads one input element.
  text = """HloModule m

ENTRY %main (a: bf16[288,192,1], b: bf16[128,128,192]) -> bf16[128,128,288] {
  %a = bf16[288,192,1]{1,0,2} parameter(0)
  %b = bf16[128,128,192]{1,2,0} parameter(1)
  ROOT %c = bf16[128,128,288]{1,2,0} convolution(%a, %b), WINDOW
}
""".replace(
    'WINDOW',
    'window={size=128 pad=127_127 rhs_reversal=1}, dim_labels=bf0_0oi->0fb',
  )
  (conv,) = [o for o in hlo_traffic.traffic(text) if o.opcode == 'convolution']
  # 128 output features x 288 batch x 128 positions x 1 tap x 192 inputs.
  assert conv.flops == 2 * 128 * 288 * 128 * 1 * 192
