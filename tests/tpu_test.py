"""Programs for the platform they are compiled for: TPU programs built on
this CPU host (libtpu, compile-only, nothing runs) carry TPU kernels, export
gives each platform its own, and `scripts.plan` reads a recipe's memory,
cost and collectives off the compiled TPU program."""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import synthetic_demo
from deeplab_jax import export, models, predict, sharding
from deeplab_jax.planning import chips, compiling, tables, traffic

# Compiles for TPU topologies (libtpu): the slow tier.
pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason='needs libtpu: pip install -e ".[tpu]"',
  ),
]
CLASSES = 4


def _smoke(**overrides):
  config = synthetic_demo.get_config('smoke')
  with config.unlocked():
    for key, value in overrides.items():
      section, leaf = key.split('.')
      config[section][leaf] = value
  return config


@pytest.mark.parametrize(
  'arch', ['deeplabv3plus_resnet_tiny', 'denseaspp_tiny']
)
def test_tpu_train_step_has_native_convolutions_and_no_cpu_kernels(arch):
  config = _smoke(**{'model.arch': arch})
  devices, _ = chips.topology_devices('v5e:2x2')
  programs, batch, _ = compiling.programs_for(config, devices, CLASSES)
  traced = programs.train.trace(programs.state, batch)
  # XLA:CPU's kernels are custom VJPs (the fusion barrier, the matmul
  # weight gradient, Winograd, DenseNet's scanned layers): none on TPU.
  assert 'custom_vjp_call' not in str(traced.jaxpr)
  tpu = traffic.convolutions(traced.lower().compile().as_text())
  # Reference: every convolution of the model forced to XLA's own.
  native, batch, _ = compiling.programs_for(
    config, devices, CLASSES, view={'conv_lowering': 'native'}
  )
  forced = native.train.lower(native.state, batch).compile().as_text()
  assert tpu == traffic.convolutions(forced) > 0
  # The same step for this host's CPU devices takes XLA:CPU's kernels.
  cpu, batch, _ = compiling.programs_for(config, jax.devices()[:4], CLASSES)
  cpu_traced = cpu.train.trace(cpu.state, batch)
  assert 'custom_vjp_call' in str(cpu_traced.jaxpr)
  assert cpu_traced.lower().as_text().count('stablehlo.convolution') < tpu


def test_1x1_convolutions_as_matmuls_move_fewer_bytes_on_tpu():
  # DenseNet's bottlenecks: the same train step with its 1x1 convolutions
  # as XLA's convolutions reads and writes more (docs/tpu.md, "Bytes per
  # image"), in float32 and bfloat16.
  devices, _ = chips.topology_devices('v5e:2x2')
  for dtype in ('float32', 'bfloat16'):
    config = _smoke(**{'model.arch': 'denseaspp_tiny', 'model.dtype': dtype})
    moved = {}
    for lowering in ('auto', 'native'):
      programs, batch, _ = compiling.programs_for(
        config, devices, CLASSES, view={'conv_lowering': lowering}
      )
      compiled = programs.train.lower(programs.state, batch).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      moved[lowering] = cost['bytes accessed']
    assert moved['auto'] < moved['native'], (dtype, moved)


def test_export_gives_each_platform_its_kernels():
  model = models.create(
    'deeplabv3plus_resnet_tiny', num_classes=CLASSES, rngs=nnx.Rngs(0)
  )
  forced = nnx.view(model, conv_lowering='native')
  convs = lambda m, p: (
    export.export(m, height=128, width=128, platforms=p)
    .mlir_module()
    .count('stablehlo.convolution')
  )
  native = convs(forced, ('tpu',))
  # TPU keeps XLA's convolutions but for the dense 1x1 ones (matmuls);
  # cuDNN keeps them but for the dense dilated ones (im2col: at 128x128
  # the rate-6 ASPP branch still reads beyond its padding).
  assert 0 < convs(model, ('tpu',)) < native
  assert 0 < convs(model, ('cuda',)) < native
  assert convs(model, ('cpu',)) == 0  # XLA:CPU's matmul lowerings
  # One artifact for all three runs here with the CPU kernels.
  both = export.export(
    model, height=40, width=56, platforms=('cpu', 'cuda', 'tpu')
  )
  x = np.random.RandomState(0).randn(2, 40, 56, 3).astype(np.float32)
  want = np.asarray(predict.logits(model, x))
  np.testing.assert_allclose(both.call(x), want, rtol=1e-5, atol=1e-5)


def _plan(*flags):
  return subprocess.run(
    [sys.executable, '-m', 'scripts.plan', *flags],
    capture_output=True,
    text=True,
    timeout=900,
  )


def test_plan_script_prints_a_row_that_fits(tmp_path):
  out = tmp_path / 'plan.jsonl'
  r = _plan(
    '--config',
    'configs/synthetic_demo.py:smoke',
    '--topology',
    'v5e:2x2',
    '--output',
    str(out),
    '--breakdown',
    '--compile_profile',
    '--largest_batch',
    # One search compile (batch 16), not the thousands of images per chip
    # this tiny model's search would reach: `test_largest_batch_is_settled`.
    '--max_compiles=1',
  )
  assert r.returncode == 0, r.stderr[-2000:]
  row = json.loads(out.read_text().splitlines()[0])
  assert '| deeplabv3plus_resnet_tiny | v5e:2x2 | 8 |' in r.stdout
  # Where the step's bytes go: the gradient's convolutions are there,
  # and the model's own code is named as their source.
  assert (
    '| kind | direction | instructions | HBM GB | logical GB | padding |'
    in r.stdout
  )
  # Bytes as laid out are at least the logical bytes; the per-instruction
  # roofline is at least the whole-step one.
  moved = row['traffic']
  assert moved['padded_hbm_bytes'] >= moved['hbm_bytes'] > 0
  assert moved['instruction_roofline_ms'] >= row['hbm_step_ms']
  kinds = {(k['kind'], k['direction']) for k in row['traffic']['by_kind']}
  assert {('convolution', 'forward'), ('convolution', 'backward')} <= kinds
  sources = {s['source'] for s in row['traffic']['by_source']}
  assert any(s.startswith('models/') for s in sources), sources
  assert row['fits'] and row['chips'] == 4 and row['mesh'] == {'data': 4}
  # Batch 8 doubled fits; nothing yet shows that 20 does not.
  assert (row['largest_batch'], row['largest_batch_settled']) == (16, False)
  assert ' | >= 16 | ' in r.stdout
  total = sum(row[k] for k in ('argument_bytes', 'temp_bytes', 'output_bytes'))
  assert row['total_bytes'] == total + row['code_bytes']
  assert row['margin_bytes'] == row['hbm_bytes'] - row['total_bytes']
  # Independent reference: the gradients summed over the 4 chips are the
  # model's float32 parameters, at least once (XLA may add BatchNorm's
  # batch statistics and loss terms to the same all-reduces), but for
  # taps that only ever read padding: at the 64x64 crop the ASPP sees a
  # 4x4 map, which its rates 12, 24 and 36 reach beyond from every
  # position, so 8 of the 9 taps of each of its three 3x3 kernels
  # (256 -> 16 channels) have zero gradients, which XLA need not sum.
  model = compiling.abstract_model(_smoke(), 11)  # synthetic_shapes: 11 classes
  params = nnx.state(model, nnx.Param)
  param_bytes = sum(4 * np.prod(p.shape) for p in jax.tree.leaves(params))
  dead_taps = 3 * 8 * 256 * 16 * 4
  reduced = row['collectives']['all-reduce']['bytes']
  assert param_bytes - dead_taps <= reduced < 2 * param_bytes, (
    reduced,
    param_bytes,
  )
  assert row['hbm_step_ms'] >= row['model_compute_ms'] > 0
  # The convolutions' and matmuls' FLOPs read from their shapes, taps on
  # the padding left out as XLA leaves them out: part of XLA's count of the
  # whole step (which adds the elementwise work), most of it.
  assert 0.75 * row['flops'] < moved['flops'] <= row['flops']
  # An unrolled step: XLA's columns are whole, nothing is marked.
  assert moved['looped'] == 0 and '* XLA' not in r.stdout
  scanned = dict(row, traffic=dict(moved, looped=5))
  assert f'| {row["flops"] / 1e9:.1f}* |' in tables.table([scanned])
  assert "* XLA's cost analysis counts each loop's body once" in tables.table(
    [scanned]
  )
  assert 0 < row['train_compile_s'] <= row['compile_s']
  # libtpu's own account of the compile, against this process's clock:
  # the train step first, then eval, then the largest-batch search's
  # train steps; each one's stages within its end to end.
  train, evaluation, *search = row['compile_profile']
  modules = [m['module'] for m in row['compile_profile']]
  assert modules == ['jit_train_step', 'jit_eval_step'] + [
    'jit_train_step'
  ] * len(search)
  assert len(search) == 1, 'the largest-batch search compiled batch 16'
  stages = train['stages']
  assert 0.5 * row['train_compile_s'] < stages['END_TO_END']
  assert stages['END_TO_END'] <= row['train_compile_s']
  parts = ('HLO_PASSES', 'BACKEND_PASSES', 'CODE_GENERATION')
  assert sum(stages[k] for k in parts) <= stages['END_TO_END']
  assert 'layout-assignment' in train['passes']
  assert '| jit_train_step | ' in r.stdout


def test_largest_batch_is_settled_where_the_next_size_does_not_fit():
  # A chip whose HBM ends between this model's train step at batch 12 and
  # at 16 (4 chips: one image per chip more), each compiled here: the
  # search, knowing 8 fits and 16 does not, compiles 12, returns it and
  # says it is settled (largest_batch_test.py: how it chooses sizes).
  devices, chip = chips.topology_devices('v5e:2x2')
  config = _smoke()
  total = lambda batch: compiling.memory(
    compiling.compile_programs(
      config, devices, CLASSES, train_batch=batch, with_eval=False
    )['train']
  )['total_bytes']
  at = {batch: total(batch) for batch in (8, 12, 16)}
  assert at[8] < at[12] < at[16], at
  small = dataclasses.replace(chip, hbm_bytes=(at[12] + at[16]) / 2)
  found = compiling.largest_batch(
    config, devices, CLASSES, small, {8: at[8], 16: at[16]}, max_compiles=4
  )
  assert found == (12, True)


def test_plan_script_refuses_bad_input_in_one_line():
  r = _plan(
    '--config', 'configs/synthetic_demo.py:smoke', '--topology', 'v9:2x2'
  )
  assert r.returncode == 1
  # One line: libtpu's start-up lines on a host without a TPU are quiet.
  assert r.stderr.strip().startswith("error: unknown TPU topology 'v9:2x2'"), (
    r.stderr
  )
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert 'v5e:2x4' in r.stderr
  r = _plan(
    '--config',
    'configs/synthetic_demo.py:smoke',
    '--config.train.batch_size=6',
    '--topology',
    'v5e:2x2',
  )
  assert r.returncode == 1
  assert 'error: train.batch_size=6 does not split over the 4' in r.stderr


def test_spatial_tpu_program_exchanges_halos():
  # Each image's height over the 4 chips of one host (v5e:2x4 has two):
  # convolutions exchange halo rows with collective-permute, and no map
  # of half the input's resolution or more is all-gathered (the decoder's
  # stride-4 logits are, for the final resize).
  crop = (128, 64)
  config = _smoke(**{'mesh.shape': (2, 4), 'data.crop_size': crop})
  devices, _ = chips.topology_devices('v5e:2x4')
  compiled = compiling.compile_programs(
    config, devices, CLASSES, with_eval=False
  )
  text = compiled['train'].as_text()
  assert compiled['mesh'].shape[sharding.SPATIAL_AXIS] == 4
  assert traffic.collectives(text)['collective-permute']['count'] > 0
  # The gathered results (`collective_shapes` reads results, not the shards
  # beside them: hlo_traffic_test.py): the tallest is the stride-4 logits,
  # 128 / 4 = 32 rows (XLA also gathers some stride-16 maps, 8 rows).
  gathered = [
    [int(d) for d in dims.split(',')]
    for shape in traffic.collective_shapes(text, 'all-gather')
    for dims in re.findall(r'\[([\d,]+)\]', shape)
  ]
  maps = [dims for dims in gathered if len(dims) == 4]
  assert maps, gathered
  assert max(dims[1] for dims in maps) == crop[0] // 4, maps


def test_fsdp_cuts_per_chip_state_about_d_fold():
  # The state (parameters, Adam's two moments) is sharded over the 8 chips'
  # data axis: its per-chip bytes fall about 8-fold from what each chip
  # would hold whole (tensors too small to split, such as BatchNorm's,
  # stay whole). Reference: the state's bytes counted from the model's
  # shapes; the compiled program's arguments less the batch shard.
  devices, _ = chips.topology_devices('v5e:2x4')
  config = _smoke(**{'mesh.param_sharding': 'fsdp'})
  with config.unlocked():
    # Wide enough that most of the state is in tensors FSDP splits (16k
    # elements and more), still a quick compile.
    config.model.options.resnet_width = 32
    config.model.options.aspp_channels = 128
  assert config.optim.name == 'adam' and not config.optim.ema_decay
  model = compiling.abstract_model(config, CLASSES)
  size = lambda kind: sum(
    4 * np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, kind))
  )
  whole = 3 * size(nnx.Param) + size(nnx.BatchStat)
  compiled = compiling.compile_programs(
    config, devices, CLASSES, with_eval=False
  )
  args = compiled['train'].memory_analysis().argument_size_in_bytes
  h, w = config.data.crop_size
  batch_shard = config.train.batch_size // 8 * h * w * 4  # uint8 RGB + label
  assert whole / (args - batch_shard) > 6, (whole, args - batch_shard)


def test_plan_of_a_run_too_big_for_the_slice_says_it_does_not_fit():
  # 1,024 images of 512x512 per chip: the TPU compiler refuses the program
  # (its temporaries exceed 16 GB); the plan says so instead of failing.
  # Default flags: no largest-batch search (it is opt-in).
  r = _plan(
    '--config',
    'configs/synthetic_demo.py:smoke',
    '--config.train.batch_size=4096',
    '--config.data.crop_size=(512,512)',
    '--topology',
    'v5e:2x2',
  )
  assert r.returncode == 0, r.stderr[-2000:]
  row = json.loads(next(x for x in r.stdout.splitlines() if x[:1] == '{'))
  assert 'largest_batch' not in row
  assert row['fits'] is False
  if 'refused' in row:
    assert row['need_bytes'] > row['hbm_bytes']
    assert '| NO (the TPU compiler refused it) |' in r.stdout
  else:
    assert row['total_bytes'] > row['hbm_bytes']


def test_traffic_fixtures_are_what_libtpu_compiles():
  """tests/fixtures/tpu_hlo/ holds what libtpu compiles today: XLA's counts
  of each fixture program, compiled again, equal the ones kept beside the
  HLO that traffic_fixtures_test.py counts by hand."""
  from tests import tpu_fixtures

  with open(os.path.join(tpu_fixtures.FIXTURES, 'xla_counts.json')) as f:
    kept = json.load(f)
  devices = tpu_fixtures.v5e_devices()
  assert set(kept) == set(tpu_fixtures.programs(devices))
  for name, counts in kept.items():
    assert tpu_fixtures.compile_fixture(name, devices)[1] == counts, name
