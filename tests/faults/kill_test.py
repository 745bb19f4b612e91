"""SIGKILL at seeded random points of training, saving and deletion, and
SIGTERM during a save, all in one run that is resumed after each fault: the
final parameters equal an uninterrupted run's, bit for bit."""

import glob
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import (
  REPO,
  assert_bitwise_equal,
  env,
  run,
  steps_in,
  train_cmd,
  wait_for,
)
from conftest import weights as final_weights

# Several processes and injected faults: the slow tier.
pytestmark = pytest.mark.slow

FLAGS = (
  '--config.train.num_steps=30',
  '--config.checkpoint.every_steps=3',
  '--config.checkpoint.keep=2',
)
# One of each, in an order shuffled with a fixed seed.
FAULTS = ['kill_training', 'kill_saving', 'kill_deleting', 'term_saving']


def _tmp_steps(ckpts):
  """Orbax's temporary step directories (a save in progress)."""
  return glob.glob(os.path.join(ckpts, '*.orbax-checkpoint-tmp'))


def _logged_lines(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def _trash(ckpts):
  # The training process empties and removes trash/ while this polls.
  try:
    return os.listdir(os.path.join(ckpts, 'trash'))
  except FileNotFoundError:
    return []


def test_faults_in_one_run_end_equal_to_uninterrupted(data_dir, tmp_path):
  ref = str(tmp_path / 'ref')
  r = run(train_cmd(ref, data_dir, *FLAGS))
  assert r.returncode == 0, r.stderr[-2000:]

  workdir = str(tmp_path / 'faulty')
  ckpts = os.path.join(workdir, 'checkpoints')
  rng = np.random.RandomState(2026)
  faults = list(rng.permutation(FAULTS))
  for fault in faults:
    before = steps_in(ckpts)
    trash_before = len(_trash(ckpts))
    leftovers = set(_tmp_steps(ckpts))  # of an earlier kill, cleaned up
    logged = _logged_lines(workdir)
    proc = subprocess.Popen(
      train_cmd(workdir, data_dir, *FLAGS),
      cwd=REPO,
      env=env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
    )
    if fault == 'kill_training':
      hit = wait_for(lambda b=before: steps_in(ckpts) != b, proc)
      time.sleep(rng.uniform(0, 0.3))
    elif fault in ('kill_saving', 'term_saving'):
      # A new step being written: once the loop runs (a new metrics line)
      # and the leftovers of an earlier kill are cleaned up.
      hit = wait_for(
        lambda n=logged, old=leftovers: (
          _logged_lines(workdir) > n and not old & set(_tmp_steps(ckpts))
        ),
        proc,
      ) and wait_for(lambda: _tmp_steps(ckpts), proc)
      time.sleep(rng.uniform(0, 0.02))
    else:  # garbage collection renames an old step into trash/
      hit = wait_for(lambda n=trash_before: len(_trash(ckpts)) > n, proc)
    assert hit, f'{fault}: the run ended before the fault was injected'
    if fault == 'term_saving':
      proc.send_signal(signal.SIGTERM)
      out, _ = proc.communicate(timeout=300)
      assert proc.returncode == 0, fault
      step = int(re.search(r'at step (\d+)', out).group(1))
      assert f'saved a checkpoint at step {step}' in out
      assert steps_in(ckpts)[-1] == step
    else:
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
      # The fault hit a live run: killed by the signal, not finished.
      assert proc.returncode == -signal.SIGKILL, fault
    assert not steps_in(ckpts) or steps_in(ckpts)[-1] < 30, fault

  r = run(train_cmd(workdir, data_dir, *FLAGS))
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'done: step 30' in r.stdout
  assert_bitwise_equal(final_weights(workdir), final_weights(ref))
  # Nothing half-written or half-deleted is left behind.
  assert not _tmp_steps(ckpts) and not _trash(ckpts)
  assert not os.path.exists(os.path.join(ckpts, 'corrupt'))
