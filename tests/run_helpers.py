"""Helpers shared by the training tests and the fault suite: configs with
dotted-key overrides, the training command line, a run's final weights."""

import os
import subprocess
import sys

import numpy as np
from flax import nnx

from configs import synthetic_demo
from deeplab_jax import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(data_dir, **overrides):
  """`synthetic_demo.py:smoke` reading `data_dir`, with dotted-key
  overrides (`**{'train.batch_size': 8}`)."""
  c = synthetic_demo.get_config('smoke')
  c.unlock()
  c.data.data_dir = data_dir
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


def train_cmd(workdir, data_dir, *flags):
  """`python -m scripts.train` on the smoke config, with extra flags;
  `data_dir` None keeps the config's own (the data set is generated)."""
  return [
    sys.executable,
    '-m',
    'scripts.train',
    '--config',
    'configs/synthetic_demo.py:smoke',
    '--workdir',
    str(workdir),
    *([f'--config.data.data_dir={data_dir}'] if data_dir else []),
    *flags,
  ]


def finish_all(procs, timeout=600):
  """Waits for every process and returns `[(returncode, stdout, stderr)]`;
  on a timeout kills them all, so that no pipe outlives the test."""
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return [
    (p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)
  ]


def run_python(args, timeout=300, **env):
  """`python ARGS` in the repository, output captured, `env` added to this
  process's environment."""
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=dict(os.environ, **env),
  )


def one_error_line(returncode, stderr):
  """The one line a refused command prints (`error: ...`, exit 1)."""
  assert returncode == 1, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  return lines[0]


def weights(workdir, **load_options):
  """The final parameters and BN statistics of a run: `'a.b.c' -> array`."""
  model, _ = checkpointing.load_model(
    os.path.join(workdir, 'checkpoints'), **load_options
  )
  return _flat_weights(model)


def initial_weights(cfg):
  """The weights a run of `cfg` starts from (its seeded initialisation)."""
  from deeplab_jax import models
  from deeplab_jax.data import datasets

  model = models.create(
    cfg.model.arch,
    num_classes=datasets.label_spec(cfg.data.dataset).num_classes,
    rngs=nnx.Rngs(cfg.seed),
    **cfg.model.options.to_dict(),
  )
  return _flat_weights(model)


def assert_same_update(w0, a, b, rtol):
  """Runs `a` and `b` from `w0` made the same update: for every tensor,
  `max |da - db| <= rtol * max |da|` (the update, not the weights: a
  small step is invisible next to the weights' own size). At least one
  tensor must have moved."""
  assert w0.keys() == a.keys() == b.keys()
  moved = 0
  for k in w0:
    da, db = a[k] - w0[k], b[k] - w0[k]
    scale = np.abs(da).max()
    moved += scale > 0
    assert np.abs(da - db).max() <= rtol * scale + 1e-9, (
      f'{k}: updates differ by {np.abs(da - db).max():.3g}, size {scale:.3g}'
    )
  assert moved > len(w0) // 2, f'only {moved} of {len(w0)} tensors moved'


def _flat_weights(model):
  tree = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  out = {}

  def walk(t, prefix):
    for k, v in t.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[prefix + str(k)] = np.asarray(v)

  walk(tree, '')
  return out


def assert_bitwise_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
