"""The benchmark script runs for a tiny model and prints every field."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {
  'framework',
  'arch',
  'batch',
  'size',
  'dtype',
  'train_img_s',
  'eval_img_s',
  'peak_mem_mb',
  'gflops_per_img',
}
JAX_FIELDS = FIELDS | {
  'devices',
  'spatial',
  'param_sharding',
  'compile_s',
  'train_program_mb_per_device',
  'train_tflop_s',
  'peak_tflop_s',
  'train_mfu',
}


def _benchmark(*flags: str) -> subprocess.CompletedProcess:
  r = subprocess.run(
    [sys.executable, '-m', 'scripts.benchmark', *flags],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.mark.slow
def test_benchmark_prints_a_jax_row_on_a_spatial_fsdp_mesh():
  # The PyTorch side: test_torch_reference_row_has_every_field.
  r = _benchmark(
    *('--arch', 'deeplabv3_resnet_tiny', '--batch', '2', '--size', '64x64'),
    *('--steps', '1', '--devices', '4', '--spatial', '2'),
    *('--param_sharding', 'fsdp', '--aux'),
  )
  rows = [
    json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')
  ]
  # One child process (each measurement compiles afresh, a minute or two
  # here): a (2, 2) mesh of simulated devices, each image split over two,
  # the train state split over the data axis (FSDP).
  got = [(r['devices'], r['spatial'], r['param_sharding']) for r in rows]
  assert got == [(4, 2, 'fsdp')]
  assert rows[0]['aux']  # the auxiliary head trained too
  for row in rows:
    assert JAX_FIELDS <= set(row) and row['framework'] == 'jax'
    assert row['train_img_s'] > 0 and row['gflops_per_img'] > 0
    assert 0 < row['train_mfu'] and row['peak_source'] == 'measured matmul'
  assert rows[0]['batch'] == 4  # --batch per data-axis slot
  assert '| framework |' in r.stdout


def test_prepared_table_streams_rows_to_a_file_by_phase(tmp_path):
  # The PyTorch phase of the CPU-sized table (the GPU table runs the same
  # code): each row is in the file as it finished.
  out = tmp_path / 'rows.jsonl'
  _benchmark('--table', 'tiny', '--nojax', '--torch', '--output', str(out))
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r['framework'], r['arch'], r['batch']) for r in rows] == [
    ('torch', 'lraspp_mobilenet_v3_large', 1),
    ('torch', 'lraspp_mobilenet_v3_large', 2),
  ]
  for row in rows:
    assert FIELDS <= set(row) and row['train_img_s'] > 0
    assert row['compile_s'] == 0.0 and row['compile_mode'] is None


def _raise_oom():
  raise MemoryError('RESOURCE_EXHAUSTED: out of memory\nmore detail')


def _sleep_long():
  import time

  time.sleep(60)


def _die():
  os._exit(3)


def test_failed_or_late_measurements_become_rows():
  import time

  from deeplab_jax.benchmarking import runs as benchmark_runs

  assert benchmark_runs.isolated(_raise_oom) == {
    'error': 'MemoryError: RESOURCE_EXHAUSTED: out of memory'
  }
  assert benchmark_runs.isolated(_die) == {
    'error': 'the measurement process died (exit 3)'
  }
  t = time.monotonic()
  row = benchmark_runs.isolated(_sleep_long, timeout=1.0)
  assert row == {'error': 'stopped at the deadline, after 1 s'}
  assert time.monotonic() - t < 30  # killed, not waited for
  # Past the deadline nothing starts; each skipped measurement says so.
  rows = list(
    benchmark_runs.model_rows(
      ['deeplabv3_resnet_tiny'],
      batches=[1, 2],
      size=(32, 32),
      steps=1,
      dtype='float32',
      frameworks=('jax', 'torch'),
      deadline=time.monotonic() - 1,
    )
  )
  assert [(r['framework'], r['batch'], r['error']) for r in rows] == [
    ('jax', 1, 'skipped: past the deadline'),
    ('torch', 1, 'skipped: past the deadline'),
    ('jax', 2, 'skipped: past the deadline'),
    ('torch', 2, 'skipped: past the deadline'),
  ]
  assert '| error |' in benchmark_runs.results_table(rows).splitlines()[0]


def test_torch_reference_row_has_every_field():
  from deeplab_jax import benchmarking

  row = benchmarking.torch_model(
    'deeplabv3_resnet50', batch=2, size=(64, 64), steps=1
  )
  assert FIELDS <= set(row) and row['framework'] == 'torch'
  assert row['train_img_s'] > 0 and row['eval_img_s'] > 0
  with pytest.raises(ValueError, match='no PyTorch reference for deeplabv3_r'):
    benchmarking.torch_reference('deeplabv3_resnet_tiny', num_classes=19)


@pytest.mark.parametrize(
  'arch',
  [
    'deeplabv3_resnet50',
    'deeplabv3plus_resnet101',
    'deeplabv3plus_xception65',
    'denseaspp121',
  ],
)
def test_jax_side_is_the_reference_network(arch):
  # The converter reads the architecture off the PyTorch reference's own
  # state dict; the benchmark must build exactly that configuration.
  from deeplab_jax import benchmarking
  from deeplab_jax.convert import torch as torch_convert
  from deeplab_jax.convert.official_denseaspp_torch import official_state_dict
  from deeplab_jax.models import registry

  ref = benchmarking.torch_reference(arch, num_classes=19)
  sd = ref.state_dict()
  if arch.startswith('denseaspp'):
    sd = official_state_dict(ref)  # the released checkpoints' key names
  converted = torch_convert.load(arch, sd)
  benchmarked = registry.make_config(
    arch, **benchmarking.reference_overrides(arch)
  )
  assert converted.num_classes == 19
  assert converted.config == benchmarked


def test_matmul_flops_hand_counted():
  import jax
  import jax.numpy as jnp

  from deeplab_jax import benchmarking
  from deeplab_jax.models import conv_lowering

  x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 4))
  conv = 2 * (2 * 16 * 16 * 4) * (8 * 9)  # 2 x outputs x multiply-adds each
  # Per-tap matmuls skip the padding: per dimension the 3 taps reach 15,
  # 16 and 15 of the 16 outputs.
  taps = 2 * (2 * 46 * 46 * 4) * 8
  for lowering, want in (('native', conv), ('im2col', conv), ('taps', taps)):
    loss = lambda x, k, low=lowering: conv_lowering.conv2d(
      x, k, lowering=low
    ).sum()
    fwd = jax.make_jaxpr(loss)(x, k).jaxpr
    bwd = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k).jaxpr
    assert benchmarking.matmul_flops(fwd) == want
    assert benchmarking.matmul_flops(bwd) == 3 * want  # + both gradients
  # Nested (jit, checkpoint) calls are counted too.
  nested = jax.jit(lambda a: jax.checkpoint(lambda a: a @ a)(a) @ a)
  jaxpr = jax.make_jaxpr(nested)(jnp.ones((4, 5, 5))).jaxpr
  assert benchmarking.matmul_flops(jaxpr) == 2 * (2 * 4 * 5 * 5 * 5)
  # A scan's body counts once per iteration.
  scanned = lambda a: jax.lax.scan(lambda c, _: (c @ c, None), a, length=3)[0]
  jaxpr = jax.make_jaxpr(scanned)(jnp.ones((5, 5))).jaxpr
  assert benchmarking.matmul_flops(jaxpr) == 3 * (2 * 5 * 5 * 5)


def test_kernel_time_summary_of_hand_built_traces(tmp_path):
  import gzip

  from deeplab_jax import benchmarking

  def write(folder, name, events):
    d = tmp_path / folder / 'plugins'
    d.mkdir(parents=True)
    with gzip.open(d / f'{name}_trace.json.gz', 'wt') as f:
      json.dump({'traceEvents': events}, f)
    return str(tmp_path / folder)

  gpu, host = {'pid': 1}, {'pid': 2}
  jax_events = [
    {'ph': 'M', 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
    {'ph': 'M', 'name': 'process_name', 'args': {'name': '/host:CPU'}},
    {'ph': 'X', 'name': 'sm90_xmma_wgrad_implicit_gemm', 'dur': 3000.0},
    {'ph': 'X', 'name': 'nvjet_sm90_tst_256x128', 'dur': 1000.0},
    {'ph': 'X', 'name': 'loop_add_fusion', 'dur': 500.0},
    {'ph': 'X', 'name': 'input_transpose_fusion', 'dur': 250.0},
  ]
  for e, pid in zip(jax_events, [gpu, host, gpu, gpu, gpu, gpu], strict=True):
    e.update(pid)
  jax_events.append({'ph': 'X', 'name': 'cudnn-conv.3', 'dur': 9e6, **host})
  summary = benchmarking.kernel_time_summary(
    write('jax', 'perfetto', jax_events), steps=2
  )
  ms = summary['kernel_ms_per_step']
  assert ms == {
    'conv': 1.5,
    'matmul': 0.5,
    'other': 0.25,
    'copy': 0.125,
    'total': 2.375,
  }
  assert summary['top_kernels'][0][:3] == [
    'sm90_xmma_wgrad_implicit_gemm',
    'conv',
    1.5,
  ]
  torch_events = [
    {
      'ph': 'X',
      'cat': 'kernel',
      'name': 'batch_norm_collect_stats',
      'dur': 40.0,
    },
    {'ph': 'X', 'cat': 'gpu_memcpy', 'name': 'Memcpy DtoD', 'dur': 10.0},
    {'ph': 'X', 'cat': 'cpu_op', 'name': 'aten::conv2d', 'dur': 1e6},
  ]
  summary = benchmarking.kernel_time_summary(
    write('pt', 'torch', torch_events), 1
  )
  assert summary['kernel_ms_per_step'] == {
    'norm': 0.04,
    'copy': 0.01,
    'total': 0.05,
  }

  # XLA:CPU: the ops' own events on host threads (hlo_op in their args).
  def op(name, dur):
    return {'ph': 'X', 'name': name, 'dur': dur, 'args': {'hlo_op': name}}

  cpu = [op('ynn_fusion.3', 6000.0), op('pad_slice_fusion', 2e3)]
  cpu += [op('add_rsqrt_fusion', 1000.0), {'ph': 'X', 'name': 'Execute'}]
  for e in cpu:
    e.update(host)
  summary = benchmarking.kernel_time_summary(
    write('cpu', 'perfetto', [jax_events[1], *cpu]), 2
  )
  assert summary['kernel_ms_per_step'] == {
    'copy': 1.0,
    'matmul': 3.0,
    'other': 0.5,
    'total': 4.5,
  }

  # PyTorch on CPU: operators' self times (nested ones subtracted).
  def cpu_op(name, ts, dur, tid=1):
    return {
      'ph': 'X',
      'cat': 'cpu_op',
      'name': name,
      'ts': ts,
      'dur': dur,
      'tid': tid,
    }

  torch_cpu = [
    cpu_op('aten::conv2d', 0.0, 100.0),
    cpu_op('aten::mkldnn_convolution', 10.0, 80.0),
    cpu_op('autograd::engine::evaluate_function: ReluBackward0', 0.0, 40.0, 2),
    cpu_op('aten::threshold_backward', 5.0, 30.0, 2),
    cpu_op('aten::native_batch_norm', 100.0, 20.0),
    cpu_op('aten::cat', 120.0, 60.0),
  ]
  summary = benchmarking.kernel_time_summary(write('tc', 'torch', torch_cpu), 2)
  assert summary['kernel_ms_per_step'] == pytest.approx(
    {'conv': 0.05, 'copy': 0.03, 'norm': 0.01, 'other': 0.02, 'total': 0.11}
  )
  assert summary['top_kernels'][0][:2] == ['aten::mkldnn_convolution', 'conv']
  assert summary['top_kernels'][0][2] == pytest.approx(0.04)
  assert benchmarking.kernel_time_summary(write('none', 'torch', []), 1) == {}


def test_lowering_flag_offers_every_lowering():
  # The script spells the list out (importing it would start JAX early).
  from absl import flags

  from deeplab_jax.models import conv_lowering
  from scripts import benchmark

  flag = flags.FLAGS[benchmark._LOWERING.name]
  assert flag.parser.enum_values == list(conv_lowering.LOWERINGS)
