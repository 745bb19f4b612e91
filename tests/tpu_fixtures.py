"""Small TPU programs whose bytes are counted by hand in
`tests/traffic_fixtures_test.py`: compiled for v5e (libtpu, compile-only)
and kept as optimised HLO text in `tests/fixtures/tpu_hlo/`, each with
XLA's own `bytes accessed` and FLOPs, so the analyzer's tests run without
libtpu. `python -m tests.tpu_fixtures` writes them again (needs the `tpu`
or `test` extra); `tests/tpu_test.py` checks that they still compile to
the same counts."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
FIXTURES = os.path.join(HERE, 'tpu_hlo')


def _spec(shape, dtype, mesh=None, spec=None):
  sharding = NamedSharding(mesh, spec or P()) if mesh is not None else None
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _conv(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _conv7x7_s2(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (2, 2), ((3, 3), (3, 3)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def programs(devices):
  """`{name: (function, argument specs, jit options)}` of every fixture."""
  one = jax.sharding.Mesh(np.array(devices[:1]), ('x',))
  four = jax.sharding.Mesh(np.array(devices[:4]), ('x',))
  f32 = jnp.float32
  s = lambda *shape, dtype=f32: _spec(shape, dtype, one)

  def scan(x, w):
    def layer(h, wi):
      return jnp.tanh(h @ wi), None

    return jax.lax.scan(layer, x, w)[0]

  def collective(body, out_spec=None):
    return jax.shard_map(
      body,
      mesh=four,
      in_specs=P('x'),
      out_specs=out_spec or P('x'),
      check_vma=False,
    )

  return {
    # 8 x 64 x 64 x 48 float32: the width pads from 64 to 128 in T(8,128).
    'elementwise': (
      lambda x: jnp.maximum(1.5 * x + 0.25, 0.0),
      [s(8, 64, 64, 48)],
      {},
    ),
    'reduction': (
      lambda x: jnp.sum(x, axis=(0, 1, 2)),
      [s(8, 64, 64, 128)],
      {},
    ),
    'convolution': (_conv, [s(8, 32, 32, 128), s(3, 3, 128, 128)], {}),
    'dot': (lambda a, b: a @ b, [s(512, 256), s(256, 384)], {}),
    'concatenate': (
      lambda a, b: jnp.concatenate([a, b], axis=-1),
      [s(8, 32, 32, 128), s(8, 32, 32, 128)],
      {},
    ),
    'dynamic_update_slice': (
      lambda buf, u, i: jax.lax.dynamic_update_slice_in_dim(buf, u, i, axis=0),
      [s(64, 256, 128), s(8, 256, 128), s(dtype=jnp.int32)],
      {'donate_argnums': 0},
    ),
    # Rows i..i+7 of the buffer doubled in place: the fusion reads the
    # slice of the buffer it updates.
    'update_reading_itself': (
      lambda buf, i: jax.lax.dynamic_update_slice_in_dim(
        buf, 2 * jax.lax.dynamic_slice_in_dim(buf, i, 8, axis=0), i, axis=0
      ),
      [s(64, 256, 128), s(dtype=jnp.int32)],
      {'donate_argnums': 0},
    ),
    'scan': (scan, [s(256, 512), s(6, 512, 512)], {}),
    # Two convolutions: the memory-space assignment prefetches the first
    # kernel as three asynchronous slices (`slice-start`), joined on chip
    # by a `ConcatBitcast`.
    'sliced_prefetch': (
      lambda x, w, v: _conv(jax.nn.relu(_conv(x, w)), v),
      [s(1, 64, 64, 512), s(3, 3, 512, 128), s(3, 3, 128, 512)],
      {},
    ),
    # A 7x7 stride-2 kernel's gradient on a 3-channel image: XLA gathers
    # the input's taps into a fresh buffer (`AllocateBuffer`), one
    # `dynamic-update-slice` each.
    'fresh_buffer_update': (
      jax.grad(lambda x, w: jnp.sum(_conv7x7_s2(x, w) ** 2), argnums=1),
      [s(1, 512, 512, 3), s(7, 7, 3, 16)],
      {},
    ),
    'all_reduce': (
      collective(lambda x: jax.lax.psum(x, 'x')),
      [_spec((4 * 256, 512), f32, four, P('x'))],
      {},
    ),
    'all_gather': (
      collective(lambda x: jax.lax.all_gather(x, 'x', tiled=True), P()),
      [_spec((4 * 256, 512), f32, four, P('x'))],
      {},
    ),
    'collective_permute': (
      collective(
        lambda x: jax.lax.ppermute(x, 'x', [(i, (i + 1) % 4) for i in range(4)])
      ),
      [_spec((4 * 256, 512), f32, four, P('x'))],
      {},
    ),
  }


def compile_fixture(name, devices):
  """`(optimised HLO text, {'bytes_accessed', 'flops'})` of one fixture."""
  fn, args, options = programs(devices)[name]
  compiled = jax.jit(fn, **options).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled.as_text(), {
    'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
    'flops': float(cost.get('flops', 0.0)),
  }


def v5e_devices():
  from deeplab_jax.planning import chips

  return chips.topology_devices('v5e:2x2')[0]


def main() -> None:
  """Writes every fixture, or those named on the command line."""
  devices = v5e_devices()
  os.makedirs(FIXTURES, exist_ok=True)
  path = os.path.join(FIXTURES, 'xla_counts.json')
  counts = {}
  if sys.argv[1:] and os.path.exists(path):
    with open(path) as f:
      counts = json.load(f)
  for name in sys.argv[1:] or programs(devices):
    text, counts[name] = compile_fixture(name, devices)
    with open(os.path.join(FIXTURES, f'{name}.hlo.txt'), 'w') as f:
      f.write(text)
    print(name, counts[name], file=sys.stderr)
  with open(path, 'w') as f:
    json.dump(counts, f, indent=1, sort_keys=True)


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  main()
