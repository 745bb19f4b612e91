"""`hlo_traffic` reads what each instruction of a compiled program reads
and writes, checked against the arrays' own sizes (NumPy), and names the
kind, direction and source line of each."""

import jax
import jax.numpy as jnp
import numpy as np

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
  # 2 x multiply-adds: every output value sums 3x3 taps of 8 channels.
  assert conv[0].flops == 2 * y.size * 3 * 3 * x.shape[-1]
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
  assert sum(o.flops for o in ops) == 2 * x.size * 3 * 3


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
  assert sum(o.flops for o in convs) == 5 * 2 * x.size * 3 * 3 * 4
  # Each iteration reads its input and one layer's kernel, writes its output.
  per_layer = 2 * x.nbytes + w[0].nbytes
  assert sum(o.hbm_bytes for o in convs) >= 5 * per_layer - 5 * x.nbytes
  # The planner marks such a program: XLA's cost analysis counts the body
  # once, so its columns are not the step's.
  looped = hlo_traffic.traffic_breakdown(_compiled_text(layers, x, w))['looped']
  assert looped == sum(o.repeats > 1 for o in ops) > 0


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
