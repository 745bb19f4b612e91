"""Shared pieces of the fault-injection suite: data, configs, subprocess
training runs, and reading a run's final weights."""

import os
import subprocess
import time

import pytest

from deeplab_jax.data import datasets
from tests import run_helpers

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
  return run_helpers.config(data_dir, **{**BASE, **overrides})


def train_cmd(workdir, data_dir, *overrides):
  # A flag given twice would not simply override (tuples get merged).
  flags = [
    f'--config.{k}={v}'
    for k, v in BASE.items()
    if not any(o.startswith(f'--config.{k}=') for o in overrides)
  ]
  return run_helpers.train_cmd(workdir, data_dir, *flags, *overrides)


weights = run_helpers.weights
assert_bitwise_equal = run_helpers.assert_bitwise_equal


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


def start_two_processes(workdir, data_dir, *overrides, devices=2, env_of=None):
  """Two `scripts.train` processes of one job (gloo on 127.0.0.1), each
  with `devices` CPU devices; output piped. `env_of`: `{process: {name:
  value}}` added to one process's environment."""
  import portpicker

  port = portpicker.pick_unused_port()
  env_of = env_of or {}
  return [
    subprocess.Popen(
      train_cmd(
        workdir,
        data_dir,
        *overrides,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ),
      cwd=REPO,
      env=dict(env(devices=devices), **env_of.get(i, {})),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
