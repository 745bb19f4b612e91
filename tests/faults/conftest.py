"""Shared pieces of the fault-injection suite: data, configs, subprocess
training runs, and reading a run's final weights."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from configs import synthetic_demo
from deeplab_jax import checkpointing
from deeplab_jax.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

# Constant learning rate: a run stopped early and continued equals one run,
# whatever num_steps each part was given.
BASE = {
  'mesh.shape': (1,),
  'train.batch_size': 8,
  'optim.poly_power': 0.0,
  'eval.every_steps': 100000,
}


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  datasets.prepare('synthetic_shapes', data_dir=d)
  return d


def config(data_dir, **overrides):
  """`synthetic_demo.py:smoke` with BASE and dotted-key overrides."""
  c = synthetic_demo.get_config('smoke')
  c.unlock()
  c.data.data_dir = data_dir
  for key, value in {**BASE, **overrides}.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


def weights(workdir):
  """The final parameters and BN statistics of a run, flat and on host."""
  model, _ = checkpointing.load_model(os.path.join(workdir, 'checkpoints'))
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


def train_cmd(workdir, data_dir, *overrides):
  # A flag given twice would not simply override (tuples get merged).
  flags = [
    f'--config.{k}={v}'
    for k, v in BASE.items()
    if not any(o.startswith(f'--config.{k}=') for o in overrides)
  ]
  return [
    sys.executable,
    '-m',
    'scripts.train',
    '--config',
    'configs/synthetic_demo.py:smoke',
    '--workdir',
    workdir,
    f'--config.data.data_dir={data_dir}',
    *flags,
    *overrides,
  ]


def env(devices=1):
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices))


def run(cmd, **kwargs):
  return subprocess.run(
    cmd,
    cwd=REPO,
    env=kwargs.pop('env', env()),
    capture_output=True,
    text=True,
    timeout=600,
    **kwargs,
  )


def wait_for(predicate, proc, timeout=300, poll=0.005):
  """Polls until `predicate()` or the process ends; True if it held."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  return False


def steps_in(ckpt_dir):
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
