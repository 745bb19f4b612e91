"""SIGTERM to both processes of a two-process run (gloo on 127.0.0.1): JAX's
preemption sync point makes both save the same step and exit 0."""

import os
import signal
import subprocess

import portpicker
from conftest import REPO, env, steps_in, train_cmd, wait_for

from deeplab_jax import checkpointing


def test_two_processes_save_the_same_step_on_sigterm(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  port = portpicker.pick_unused_port()
  procs = [
    subprocess.Popen(
      train_cmd(
        workdir,
        data_dir,
        '--config.mesh.shape=(-1,)',
        '--config.train.num_steps=100000',
        '--config.checkpoint.every_steps=100000',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ),
      cwd=REPO,
      env=env(devices=2),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if not wait_for(lambda: os.path.exists(metrics), procs[0]):  # training
    for p in procs:
      p.kill()
    raise AssertionError(procs[0].communicate()[1][-3000:])
  for p in procs:  # a cluster sends the notice to every process
    p.send_signal(signal.SIGTERM)
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  steps = {int(out.strip().split()[-1]) for out in outs}
  assert len(steps) == 1, outs
  [step] = steps
  assert all(f'saved a checkpoint at step {step}' in out for out in outs)
  assert steps_in(os.path.join(workdir, 'checkpoints')) == [step]
  model, _ = checkpointing.load_model(os.path.join(workdir, 'checkpoints'))
  assert model.num_classes == 4
