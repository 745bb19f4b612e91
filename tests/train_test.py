"""End to end training: smoke run, 1 vs 8 devices, resume, faults, errors."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from deeplab_jax import checkpointing, models, predict, train
from deeplab_jax.errors import ConfigError, UserError
from tests.fake_data import cityscapes_zips
from tests.run_helpers import (
  assert_same_update,
  config,
  finish_all,
  initial_weights,
  train_cmd,
  weights,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Equal updates, up to float summation order (sharded reductions, remat),
# relative to each tensor's update size. Bound: 1e-2, about four times the
# largest rounding measured (2.6e-3 on a BatchNorm bias, whose gradient is
# a sum over every pixel with much cancellation); a missing, doubled or
# misrouted update is off by the update's own size.
UPDATE_RTOL = 1e-2


def test_smoke_run_logs_evaluates_and_checkpoints(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config(data_dir), workdir)
  assert summary['step'] == 10 and 0 <= summary['miou'] <= 1
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  losses = [r['loss'] for r in records if 'loss' in r]
  assert len(losses) == 5 and losses[-1] < losses[0]
  assert {'step', 'loss', 'lr'} <= set(records[0])
  # The train step's compile time, once, with the first log line.
  assert records[0]['compile_s'] > 0
  assert sum('compile_s' in r for r in records) == 1
  assert any('miou' in r for r in records)
  assert os.listdir(os.path.join(workdir, 'tb'))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['arch'] == 'deeplabv3plus_resnet_tiny'
  # The training checkpoint is self-describing: predict can load it.
  model, meta = checkpointing.load_model(os.path.join(workdir, 'checkpoints'))
  assert meta['class_names'] == ['background', 'disc', 'square', 'triangle']
  out = predict.logits(model, np.zeros((1, 32, 48, 3), np.float32))
  assert out.shape == (1, 32, 48, 4)
  # ... given the workdir itself, it finds `checkpoints/` there.
  again, _ = checkpointing.load_model(workdir)
  jax.tree.map(
    np.testing.assert_array_equal,
    nnx.state(again, nnx.Param),
    nnx.state(model, nnx.Param),
  )


# One SGD step from seed 1, compared across meshes and hosts. SGD, not
# Adam: Adam's update is ~lr * sign(g) for tiny gradients, which turns
# float summation-order noise into lr-sized differences. How far summation
# order moves an update depends on the draw and grows with each step: seed
# 0 of this tiny model exceeds UPDATE_RTOL within one step, seed 1 within
# two (BN biases of the ASPP head).
SGD_STEPS = {
  'train.batch_size': 8,
  'train.num_steps': 1,
  'optim.name': 'sgd',
  'optim.lr': 0.01,
  'seed': 1,
}


@pytest.fixture(scope='module')
def eight_devices(data_dir, tmp_path_factory):
  """`SGD_STEPS` on one process with 8 devices: `(workdir, summary)`, the
  reference of the sharding comparisons."""
  workdir = str(tmp_path_factory.mktemp('eight') / 'run')
  c = config(data_dir, **{'mesh.shape': (8,), **SGD_STEPS})
  return workdir, train.train_and_evaluate(c, workdir)


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['loss'] for r in map(json.loads, f) if 'loss' in r]


@pytest.mark.slow
def test_one_device_equals_eight_devices_and_split_images(
  data_dir, tmp_path, eight_devices
):
  """Synchronised BN and the sharded loss: the same update on 1 device, on
  8, and on a (2, 4) mesh that splits each image's height over 4 devices
  (XLA exchanges the halo rows); the same evaluation up to rounding."""
  workdirs, summaries = [], []
  for shape in ((1,), (2, 4)):
    workdir = str(tmp_path / 'x'.join(map(str, shape)))
    c = config(data_dir, **{'mesh.shape': shape, **SGD_STEPS})
    summaries.append(train.train_and_evaluate(c, workdir))
    workdirs.append(workdir)
  workdirs.insert(1, eight_devices[0])
  summaries.insert(1, eight_devices[1])
  results = [weights(w) for w in workdirs]
  losses = [_losses(w) for w in workdirs]
  start = initial_weights(c)
  assert_same_update(start, results[0], results[1], rtol=UPDATE_RTOL)
  assert_same_update(start, results[1], results[2], rtol=UPDATE_RTOL)
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-3)
  # The spatial mesh runs XLA's own convolutions (programs.training_view),
  # the data-parallel runs the CPU lowerings: the logits differ by float
  # rounding, which can flip the argmax of a pixel at a near tie. Bound:
  # 1e-4, about 80 of the validation split's 786,432 pixels; a wrong
  # halo or shard changes whole rows.
  for key in ('miou', 'pixel_accuracy'):
    assert abs(summaries[2][key] - summaries[1][key]) < 1e-4, key


@pytest.mark.slow
def test_workdir_of_another_config_and_bad_batch_are_refused(
  data_dir, tmp_path
):
  workdir = str(tmp_path / 'w')
  # A start that fails before its first step (here: no data prepared)
  # does not claim the workdir for its config.
  empty = str(tmp_path / 'no_data')
  os.makedirs(empty)
  with pytest.raises(UserError, match='not prepared'):
    train.train_and_evaluate(
      config(empty, **{'model.arch': 'deeplabv3_resnet_tiny'}), workdir
    )
  assert not os.path.exists(os.path.join(workdir, 'config.json'))
  first = train.train_and_evaluate(config(data_dir), workdir)
  # Asked again, the finished run reports its final evaluation, also when
  # only how the step is computed changed (remat, scanned blocks, the
  # convolutions' lowering).
  compute_only = {
    'model.remat': 'blocks',
    'model.scan_blocks': True,
    'model.conv_lowering': 'native',
  }
  again = train.train_and_evaluate(config(data_dir, **compute_only), workdir)
  assert again['step'] == 10 and again['miou'] == first['miou']
  # The record stays the run's: the change is appended, config.json kept.
  with open(os.path.join(workdir, 'resumed.jsonl')) as f:
    [resumed] = [json.loads(line) for line in f]
  assert resumed['changed'] == {
    'model.remat': ['none', 'blocks'],
    'model.scan_blocks': [False, True],
    'model.conv_lowering': ['auto', 'native'],
  }
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['remat'] == 'none'
  # Another learning rate is another run: refused, naming the key.
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config(data_dir, **{'optim.lr': 0.1}), workdir)
  assert 'optim.lr: 0.003 there, 0.1 now' in str(e.value)
  other = config(data_dir, **{'model.arch': 'deeplabv3_resnet_tiny'})
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(other, workdir)
  assert (
    "another config (model.arch: 'deeplabv3plus_resnet_tiny' there, "
    "'deeplabv3_resnet_tiny' now)" in str(e.value)
  )
  # Without config.json, the checkpoint's own data position still refuses
  # a resume that would not replay the same batches.
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config(data_dir, seed=5), workdir)
  assert 'trained with seed 0 and batch 8' in str(e.value)
  assert 'would not replay the same data' in str(e.value)
  with pytest.raises(ConfigError, match='not divisible by the 8 devices'):
    train.train_and_evaluate(
      config(data_dir, **{'mesh.shape': (8,), 'train.batch_size': 4}),
      str(tmp_path / 'w2'),
    )
  # Evaluation's batch too, before any step (it runs after training's).
  three = {'mesh.shape': (3,), 'train.batch_size': 6, 'eval.batch_size': 16}
  with pytest.raises(
    ConfigError, match='eval.batch_size=16 is not divisible by the 3 devices'
  ):
    train.train_and_evaluate(config(data_dir, **three), str(tmp_path / 'w4'))
  assert not os.path.exists(tmp_path / 'w4')
  with pytest.raises(
    ConfigError, match='height 64 gives .* use a multiple of 80'
  ):
    train.train_and_evaluate(
      config(data_dir, **{'mesh.shape': (1, 5)}), str(tmp_path / 'w3')
    )


@pytest.mark.slow
def test_main_job_without_its_data_says_what_to_download(tmp_path):
  """The main job's command with no Cityscapes: one line on stderr naming
  the files, where to get them and the command that prepares them."""
  empty = tmp_path / 'no_data'
  empty.mkdir()
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'scripts.train',
      '--config',
      'configs/cityscapes_denseaspp.py',
      '--workdir',
      str(tmp_path / 'w'),
      f'--config.data.data_dir={empty}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
  for part in (
    'error: data set cityscapes is not prepared',
    'python -m scripts.build_dataset --dataset cityscapes',
    'leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip',
    'cityscapes-dataset.com',
  ):
    assert part in r.stderr


@pytest.mark.slow
def test_class_weights_and_partial_init_from_are_said(data_dir, tmp_path):
  """Wrong-length class weights: one line, before anything is written. A
  checkpoint whose classifier does not fit: a warning on stderr naming the
  tensors that keep their initialisation (not an INFO line, which is hidden)."""
  r = subprocess.run(
    train_cmd(
      str(tmp_path / 'w'), data_dir, '--config.loss.class_weights=(1.0,2.0)'
    ),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1, r.stderr
  [line] = r.stderr.strip().splitlines()
  assert line.startswith('error: loss.class_weights has 2 values')
  assert 'synthetic_shapes has 4 classes' in line

  source = models.create(
    'deeplabv3plus_resnet_tiny', num_classes=3, rngs=nnx.Rngs(5)
  )
  ckpt = str(tmp_path / 'three_classes')
  checkpointing.save_model(ckpt, source, checkpointing.model_metadata(source))
  r = subprocess.run(
    train_cmd(
      str(tmp_path / 'w2'),
      data_dir,
      f'--config.model.init_from={ckpt}',
      '--config.train.num_steps=2',
    ),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr
  # The start is not silent: the compilation is announced and timed.
  assert 'compiling the train step (cached after the first run)' in r.stderr
  assert re.search(r'train step compiled in \d+\.\d s', r.stderr)
  assert 'keep their random initialisation' in r.stderr
  assert 'head.classifier.kernel (1, 1, 16, 4) vs (1, 1, 16, 3)' in r.stderr


@pytest.mark.slow
def test_main_job_on_generated_cityscapes_zips(tmp_path):
  """The main job's recipe (`:cityscapes_smoke`: its tiny model) through
  the real input path: official-layout zips -> scripts.build_dataset ->
  scripts.train -> scripts.evaluate on the workdir with default flags."""
  raw, tfds_dir = str(tmp_path / 'raw'), str(tmp_path / 'tfds')
  cityscapes_zips(raw, n_train=4, n_val=2, hw=(64, 128))

  def run(*args):
    r = subprocess.run(
      [sys.executable, '-m', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

  out = run(
    'scripts.build_dataset',
    '--dataset',
    'cityscapes',
    '--manual_dir',
    raw,
    '--data_dir',
    tfds_dir,
  )
  assert 'train: 4' in out and 'validation: 2' in out
  workdir = str(tmp_path / 'run')
  out = run(
    'scripts.train',
    '--config',
    'configs/cityscapes_denseaspp.py:cityscapes_smoke',
    '--workdir',
    workdir,
    f'--config.data.data_dir={tfds_dir}',
  )
  assert 'done: step 4, mIoU' in out
  assert f'next: python -m scripts.evaluate --checkpoint {workdir}' in out
  # scripts.evaluate takes the data set, split and data_dir from the run.
  out = run('scripts.evaluate', '--checkpoint', workdir)
  assert '| road |' in out and 'of cityscapes/validation' in out


def test_nan_loss_stops_with_the_step_range(data_dir, tmp_path):
  c = config(data_dir, **{'optim.lr': 1e30, 'train.num_steps': 6})
  with pytest.raises(train.TrainingDivergedError, match='between steps'):
    train.train_and_evaluate(c, str(tmp_path / 'nan'))


@pytest.mark.slow
def test_two_processes_equal_one_process(data_dir, tmp_path, eight_devices):
  """2 processes x 4 CPU devices (gloo on 127.0.0.1) == 1 process x 8."""
  import portpicker

  port = portpicker.pick_unused_port()
  multi = str(tmp_path / 'multi')
  flags = [f'--config.{k}={v}' for k, v in SGD_STEPS.items()]
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4')
  procs = [
    subprocess.Popen(
      train_cmd(
        multi,
        data_dir,
        *flags,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for returncode, _, err in finish_all(procs):
    assert returncode == 0, err[-3000:]
  assert_same_update(
    initial_weights(config(data_dir, seed=SGD_STEPS['seed'])),
    weights(eight_devices[0]),
    weights(multi),
    rtol=UPDATE_RTOL,
  )


# Under load Orbax's event loop sometimes leaves a file to the garbage
# collector (seen once, a ResourceWarning reported as unraisable); the
# test compares every weight, which such a report does not change.
@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_fsdp_and_remat_give_the_same_step(data_dir, tmp_path, eight_devices):
  """FSDP-style parameter sharding and rematerialisation change memory, not
  the numbers."""
  common = {'mesh.shape': (8,), **SGD_STEPS}
  fsdp, blocks = str(tmp_path / 'fsdp'), str(tmp_path / 'blocks')
  train.train_and_evaluate(
    config(
      data_dir,
      **common,
      **{'mesh.param_sharding': 'fsdp', 'model.remat': 'full'},
    ),
    fsdp,
  )
  train.train_and_evaluate(
    config(data_dir, **common, **{'model.remat': 'blocks'}), blocks
  )
  w0 = initial_weights(config(data_dir, seed=SGD_STEPS['seed']))
  plain = weights(eight_devices[0])
  for other in (fsdp, blocks):
    assert_same_update(w0, plain, weights(other), rtol=UPDATE_RTOL)


def test_fsdp_rule_splits_large_arrays_only():
  import jax

  from deeplab_jax import sharding

  mesh = sharding.make_mesh((8,))
  state = {
    'kernel': jax.ShapeDtypeStruct((3, 3, 64, 128), np.float32),
    'odd': jax.ShapeDtypeStruct((3, 3, 63, 127), np.float32),
    'bias': jax.ShapeDtypeStruct((128,), np.float32),
  }
  out = sharding.state_shardings(state, mesh, 'fsdp')
  assert out['kernel'].spec == jax.P(None, None, None, 'data')
  assert out['odd'].spec == jax.P() and out['bias'].spec == jax.P()
  with pytest.raises(ConfigError, match='fsdp'):
    sharding.state_shardings(state, mesh, 'zero3')


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_weights(data_dir, tmp_path):
  workdir = str(tmp_path / 'bf16')
  summary = train.train_and_evaluate(
    config(data_dir, **{'model.dtype': 'bfloat16', 'train.num_steps': 10}),
    workdir,
  )
  assert summary['step'] == 10 and np.isfinite(summary['miou'])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    losses = [json.loads(line)['loss'] for line in f if '"loss"' in line]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  final = weights(workdir)
  assert {w.dtype for w in final.values()} == {np.dtype('float32')}
  model, _ = checkpointing.load_model(os.path.join(workdir, 'checkpoints'))
  out = predict.logits(model, np.zeros((1, 32, 48, 3), np.float32))
  assert out.dtype == np.float32


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch(data_dir, tmp_path):
  """k = 2 micro-batches of 4 make the same SGD update as one batch of 8
  (frozen BN, no dropout, no padding: each micro-batch's mean loss weighs
  the same number of pixels), and the logged lr is the applied one."""
  common = {
    'mesh.shape': (1,),
    'model.freeze_bn': True,
    'model.options.aspp_dropout': 0.0,
    'data.scale_range': (1.0, 1.0),
    'optim.name': 'sgd',
    'optim.lr': 0.05,
    'optim.weight_decay': 1e-3,
    'eval.every_steps': 100,
  }
  large, accum = str(tmp_path / 'large'), str(tmp_path / 'accum')
  c = config(
    data_dir, **common, **{'train.batch_size': 8, 'train.num_steps': 1}
  )
  train.train_and_evaluate(c, large)
  train.train_and_evaluate(
    config(
      data_dir,
      **common,
      **{
        'train.batch_size': 4,
        'train.num_steps': 2,
        'optim.grad_accum_steps': 2,
        'train.log_every_steps': 1,
      },
    ),
    accum,
  )
  assert_same_update(
    initial_weights(c), weights(large), weights(accum), rtol=UPDATE_RTOL
  )
  with open(os.path.join(accum, 'metrics.jsonl')) as f:
    lrs = [json.loads(line)['lr'] for line in f if '"lr"' in line]
  assert lrs == pytest.approx([0.05, 0.05])  # both batches: update 0


def test_accumulated_schedule_is_counted_in_updates():
  """The LR each update applies, hand-computed: poly 0.9 over 8 batches
  with k = 2 gives updates at batches 0, 2, 4, 6."""
  import jax.numpy as jnp
  import ml_collections

  from deeplab_jax import optim

  o = ml_collections.ConfigDict(
    dict(
      name='sgd',
      lr=0.1,
      momentum=0.0,
      weight_decay=0.0,
      poly_power=0.9,
      warmup_steps=0,
      end_lr=0.0,
      grad_accum_steps=2,
      clip_grad_norm=0.0,
    )
  )
  tx, lr = optim.make_optimizer(o, num_steps=8)
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  steps = []
  for _ in range(8):
    updates, state = tx.update({'w': jnp.ones(())}, state, params)
    steps.append(-float(updates['w']))
  hand = [0.1 * (1 - b / 8) ** 0.9 for b in (0, 2, 4, 6)]
  np.testing.assert_allclose(steps[1::2], hand, rtol=1e-6)
  assert steps[0::2] == [0.0] * 4
  logged = [float(lr(s)) for s in range(8)]
  np.testing.assert_allclose(logged, np.repeat(hand, 2), rtol=1e-6)
  with pytest.raises(ConfigError, match='multiple of'):
    optim.make_optimizer(o, num_steps=7)


@pytest.mark.slow
def test_ema_run_evaluates_to_trainings_miou(data_dir, tmp_path):
  """With an EMA, the checkpoint's model is what training evaluated:
  scripts.evaluate on the workdir prints training's final mIoU exactly;
  --raw_weights loads the raw parameters instead."""
  workdir = str(tmp_path / 'ema')
  summary = train.train_and_evaluate(
    config(data_dir, **{'optim.ema_decay': 0.5, 'train.num_steps': 6}),
    workdir,
  )
  assert summary['step'] == 6
  ema, raw = weights(workdir), weights(workdir, raw_weights=True)
  kernel = 'backbone.conv1.kernel'
  assert not np.array_equal(ema[kernel], raw[kernel])

  def evaluate(*flags):
    r = subprocess.run(
      [
        sys.executable,
        '-m',
        'scripts.evaluate',
        '--checkpoint',
        workdir,
        '--data_dir',
        data_dir,
        *flags,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert r.returncode == 0, r.stderr
    [line] = [x for x in r.stdout.splitlines() if x.startswith('{')]
    return json.loads(line)['miou']

  assert evaluate() == summary['miou']
  assert evaluate('--raw_weights') != summary['miou']
