"""A dead process in a 2-process job: the survivor ends within the stated
bound, in one line that names the cause and the restart, with no abort
dump and no disk blame; the same two commands then resume from the last
checkpoint and finish."""

import json
import os
import signal
import time

import pytest
from conftest import start_two_processes, steps_in, wait_for

from deeplab_jax import multihost
from tests import run_helpers

# Several processes and injected faults: the slow tier.
pytestmark = pytest.mark.slow

FLAGS = (
  '--config.mesh.shape=(-1,)',
  '--config.train.num_steps=12',
  '--config.checkpoint.every_steps=4',
  '--config.train.log_every_steps=2',
)


def test_killed_process_ends_the_job_in_one_line_and_restart_resumes(
  data_dir, tmp_path
):
  workdir = str(tmp_path / 'run')
  ckpts = os.path.join(workdir, 'checkpoints')
  procs = start_two_processes(workdir, data_dir, *FLAGS)
  survivor, victim = procs
  try:
    assert wait_for(lambda: 4 in steps_in(ckpts), survivor, timeout=500)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = survivor.communicate(timeout=multihost.PEER_TIMEOUT_S + 60)
    took = time.monotonic() - killed
  finally:
    run_helpers.finish_all(procs)
  assert survivor.returncode == 1, err[-3000:]
  assert took < multihost.PEER_TIMEOUT_S + 15, took
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, err[-3000:]
  [line] = errors
  assert 'another process of the job stopped responding' in line
  assert 'Restart every process with the same command' in line
  for absent in ('Fatal Python error', 'Check failure', 'disk', 'Traceback'):
    assert absent not in err, (absent, err[-3000:])
  last = max(steps_in(ckpts))

  restarted = start_two_processes(workdir, data_dir, *FLAGS)
  for returncode, _, err in run_helpers.finish_all(restarted):
    assert returncode == 0, err[-3000:]
  assert max(steps_in(ckpts)) == 12
  # Resumed, not restarted: the steps up to the checkpoint were logged once.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line)['step'] for line in f]
  assert [s for s in logged if s <= last] == list(range(2, last + 1, 2))
  assert logged[-1] == 12
