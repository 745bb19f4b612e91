"""SIGTERM to both processes of a two-process run (gloo on 127.0.0.1): JAX's
preemption sync point makes both save the same step and exit 0."""

import os
import re
import signal
import subprocess

import pytest
from conftest import (
  REPO,
  env,
  start_two_processes,
  steps_in,
  train_cmd,
  wait_for,
)

from deeplab_jax import checkpointing
from tests import run_helpers

# Several processes and injected faults: the slow tier.
pytestmark = pytest.mark.slow


def test_two_processes_save_the_same_step_on_sigterm(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  procs = start_two_processes(
    workdir,
    data_dir,
    '--config.mesh.shape=(-1,)',
    '--config.train.num_steps=100000',
    '--config.checkpoint.every_steps=100000',
  )
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if not wait_for(lambda: os.path.exists(metrics), procs[0]):  # training
    for p in procs:
      p.kill()
    raise AssertionError(procs[0].communicate()[1][-3000:])
  for p in procs:  # a cluster sends the notice to every process
    p.send_signal(signal.SIGTERM)
  outs = []
  for returncode, out, err in run_helpers.finish_all(procs, timeout=300):
    assert returncode == 0, err[-3000:]
    outs.append(out)
  steps = {int(re.search(r'at step (\d+)', out).group(1)) for out in outs}
  assert len(steps) == 1, outs
  [step] = steps
  assert all(f'saved a checkpoint at step {step}' in out for out in outs)
  assert steps_in(os.path.join(workdir, 'checkpoints')) == [step]
  model, _ = checkpointing.load_model(os.path.join(workdir, 'checkpoints'))
  assert model.num_classes == 4


def test_ctrl_c_saves_says_how_to_resume_and_resumes(data_dir, tmp_path):
  """Ctrl-C (SIGINT) is handled like SIGTERM: the step is saved, one line
  says where and how to resume, exit 130; the same command resumes."""
  workdir = str(tmp_path / 'run')
  cmd = train_cmd(
    workdir,
    data_dir,
    '--config.train.num_steps=100000',
    '--config.checkpoint.every_steps=100000',
  )
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = os.path.join(workdir, 'metrics.jsonl')

  def training():  # a logged step: the loop runs
    if not os.path.exists(metrics):
      return False
    with open(metrics) as f:
      return '"loss"' in f.read()

  if not wait_for(training, proc):
    proc.kill()
    raise AssertionError(proc.communicate()[1][-3000:])
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err
  ckpts = os.path.join(workdir, 'checkpoints')
  [step] = steps_in(ckpts)
  assert out.strip() == (
    f'interrupted: saved a checkpoint at step {step} in {ckpts}; run the '
    'same command to resume'
  )
  # The same command resumes from that step (and may stop right away).
  cmd[cmd.index('--config.train.num_steps=100000')] = (
    f'--config.train.num_steps={step + 2}'
  )
  r = subprocess.run(
    cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'done: step {step + 2}' in r.stdout
