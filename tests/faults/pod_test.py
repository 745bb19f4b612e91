"""A 2-process job (gloo on 127.0.0.1) as a pod job meets them: a refusal
at start, a second job on a live workdir, a hung peer and a damaged step.
Every process ends at once with the same one line, or every process
resumes from the same step."""

import json
import os
import shutil
import time

import numpy as np
import pytest
from conftest import (
  assert_bitwise_equal,
  start_two_processes,
  steps_in,
  wait_for,
  weights,
)
from corruption_test import flip_byte

from deeplab_jax.run_dir import writer_lock
from tests import run_helpers

FLAGS = (
  '--config.mesh.shape=(-1,)',
  '--config.train.num_steps=8',
  '--config.checkpoint.every_steps=4',
  '--config.eval.every_steps=8',
  '--config.train.log_every_steps=2',
)
# Orbax leaves a read coroutine unfinished when a damaged array fails to
# load; Python reports it as unraisable when it is collected.
# Several processes and injected faults: the slow tier.
pytestmark = [
  pytest.mark.slow,
  pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
]
NOT_A_PEER_LOSS = (
  'stopped responding',
  'Fatal Python error',
  'Check failure',
  'Traceback',
)


def _one_line_everywhere(results):
  """Every process exited 1 with the same single `error:` line."""
  lines = []
  for returncode, _, err in results:
    assert returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, err[-3000:]
    for absent in NOT_A_PEER_LOSS:
      assert absent not in err, (absent, err[-3000:])
    lines.append(errors[0])
  assert len(set(lines)) == 1, lines
  return lines[0]


def _last_record(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f][-1]


@pytest.fixture(scope='module')
def alone(data_dir, tmp_path_factory):
  """The 2-process job run alone to its end: its workdir."""
  workdir = str(tmp_path_factory.mktemp('alone') / 'run')
  for returncode, _, err in run_helpers.finish_all(
    start_two_processes(workdir, data_dir, *FLAGS)
  ):
    assert returncode == 0, err[-3000:]
  return workdir


def test_refusals_end_every_process_and_the_live_job_goes_on(
  alone, data_dir, tmp_path
):
  workdir = str(tmp_path / 'run')
  lock = os.path.join(workdir, writer_lock.LOCK)
  first = start_two_processes(workdir, data_dir, *FLAGS)
  try:
    assert wait_for(lambda: os.path.exists(lock), first[0], timeout=300)
    start = time.monotonic()
    second = run_helpers.finish_all(
      start_two_processes(workdir, data_dir, *FLAGS), timeout=120
    )
    took = time.monotonic() - start
    line = _one_line_everywhere(second)
    assert line.startswith(f'error: {workdir} is being trained by pid ')
    assert took < 60, took
    finished = run_helpers.finish_all(first)
  finally:
    run_helpers.finish_all(first)
  for returncode, _, err in finished:
    assert returncode == 0, err[-3000:]
  # Unharmed: the same final metrics as the job run alone.
  ours, theirs = _last_record(workdir), _last_record(alone)
  assert ours['step'] == theirs['step'] == 8
  assert ours['miou'] == theirs['miou']

  # A resume with another optim.lr on the finished workdir: refused by
  # process 0's run record, said by both processes, within 60 s.
  start = time.monotonic()
  changed = run_helpers.finish_all(
    start_two_processes(workdir, data_dir, *FLAGS, '--config.optim.lr=0.5'),
    timeout=120,
  )
  took = time.monotonic() - start
  line = _one_line_everywhere(changed)
  assert line == (
    f'error: {workdir} was trained with other settings (optim.lr: 0.003 '
    'there, 0.5 now); resume with the recorded values (config.json) or use '
    'a new --workdir'
  )
  assert took < 60, took
  assert not os.path.exists(lock)


HANG_HOOK = """\
import os
import time

import deeplab_jax.sharding as sharding

_to_global, _calls = sharding.to_global, []


def to_global(*args, **kwargs):
  _calls.append(1)
  if len(_calls) == int(os.environ['DEEPLAB_TEST_HANG_AT_BATCH']):
    open(os.environ['DEEPLAB_TEST_HANG_MARK'], 'w').close()
    time.sleep(3600)  # stuck on the host, its watchdog still beating
  return _to_global(*args, **kwargs)


sharding.to_global = to_global
"""


def test_a_hung_peer_ends_the_job_naming_it(data_dir, tmp_path):
  """Process 1 stops inside its fifth step (a sitecustomize of the test
  stalls its batch) while its watchdog keeps beating: the job ends within
  train.hang_timeout_s and a period, both processes naming process 1."""
  hook = tmp_path / 'hook'
  hook.mkdir()
  (hook / 'sitecustomize.py').write_text(HANG_HOOK)
  workdir = str(tmp_path / 'run')
  bound = 45
  procs = start_two_processes(
    workdir,
    data_dir,
    *FLAGS,
    f'--config.train.hang_timeout_s={bound}',
    env_of={
      1: {
        'PYTHONPATH': os.pathsep.join([str(hook), run_helpers.REPO]),
        'DEEPLAB_TEST_HANG_AT_BATCH': '5',
        'DEEPLAB_TEST_HANG_MARK': str(tmp_path / 'hung'),
      }
    },
  )
  hung = tmp_path / 'hung'
  try:
    assert wait_for(hung.exists, procs[1], timeout=400), 'process 1 ended first'
    start = time.monotonic()
    results = run_helpers.finish_all(procs, timeout=bound + 120)
    took = time.monotonic() - start
  finally:
    run_helpers.finish_all(procs)
  line = _one_line_everywhere(results)
  assert line == (
    f'error: process 1 at step 5 made no progress for {bound} s while the '
    'others wait at step 6 (train.hang_timeout_s): it hangs (a stalled file '
    'system, a stuck input pipeline); every process stops. Restart every '
    'process with the same command; the run resumes from its last checkpoint'
  )
  assert took < bound + 60, took
  assert not os.path.exists(os.path.join(workdir, writer_lock.LOCK))


def test_a_damaged_step_is_skipped_by_every_process(alone, data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(alone, workdir)
  ckpts = os.path.join(workdir, 'checkpoints')
  flip_byte(os.path.join(ckpts, '8'), np.random.RandomState(0))
  results = run_helpers.finish_all(
    start_two_processes(workdir, data_dir, *FLAGS)
  )
  for returncode, _, err in results:
    assert returncode == 0, err[-3000:]
  assert 'resuming from step 4 (saved at ' in results[0][2]
  assert os.listdir(os.path.join(ckpts, 'corrupt')) == ['8']
  assert steps_in(ckpts) == [4, 8]
  assert_bitwise_equal(weights(workdir), weights(alone))
