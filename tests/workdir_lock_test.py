"""A workdir has one writer: a second `scripts.train` on a live workdir is
refused at once, a lock left by a dead process does not block, and a lock
of another host expires as a lease."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from deeplab_jax import run_dir
from tests.run_helpers import train_cmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(workdir, data_dir):
  return subprocess.Popen(
    train_cmd(workdir, data_dir),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_second_trainer_is_refused_and_a_killed_ones_lock_does_not_block(
  data_dir, tmp_path
):
  workdir = str(tmp_path / 'w')
  lock = os.path.join(workdir, run_dir.LOCK)
  first = _start(workdir, data_dir)
  try:
    deadline = time.time() + 120
    while not os.path.exists(lock) and first.poll() is None:
      assert time.time() < deadline, 'the first run never took the lock'
      time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    # The same command again, while the first one runs.
    second = subprocess.run(
      train_cmd(workdir, data_dir),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1, second.stderr[-2000:]
    assert lines[-1].startswith(f'error: {workdir} is being trained by pid ')
    assert f'pid {first.pid} on {socket.gethostname()} since ' in lines[-1]
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGKILL)
    first.communicate()
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()
  # The killed run's lock is stale: the same command trains and finishes,
  # and the lock is gone afterwards.
  assert os.path.exists(lock)
  third = subprocess.run(
    train_cmd(workdir, data_dir),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert third.returncode == 0, third.stderr[-2000:]
  assert not os.path.exists(lock)


def test_lock_of_another_host_is_a_lease(tmp_path):
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  path = os.path.join(workdir, run_dir.LOCK)
  holder = {'host': 'elsewhere', 'pid': 1, 'since': '2026-01-01T00:00:00'}
  with open(path, 'w') as f:
    json.dump(holder, f)
  with pytest.raises(run_dir.WorkdirBusyError, match='pid 1 on elsewhere'):
    run_dir.WriterLock(workdir, lease_s=60).acquire()
  old = time.time() - 61
  os.utime(path, (old, old))  # not renewed for longer than the lease
  lock = run_dir.WriterLock(workdir, lease_s=60).acquire()
  with open(path) as f:
    assert json.load(f)['pid'] == os.getpid()
  # A live holder renews its lease: the file's time moves.
  renewing = run_dir.WriterLock(str(tmp_path / 'v'), lease_s=0.4).acquire()
  first = os.path.getmtime(renewing.path)
  time.sleep(0.5)
  assert os.path.getmtime(renewing.path) > first
  renewing.release()
  lock.release()
  assert not os.path.exists(path) and os.path.isdir(workdir)
  # A workdir the lock created, and nothing else wrote, is removed.
  assert not os.path.exists(tmp_path / 'v')


def test_lock_of_a_reused_pid_is_stale(tmp_path):
  # This process's own pid, but another start time: the holder is gone
  # and its pid belongs to someone else now.
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  with open(os.path.join(workdir, run_dir.LOCK), 'w') as f:
    json.dump(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'start': '1'}, f
    )
  run_dir.WriterLock(workdir).acquire().release()
  # The same start time: a live holder, refused.
  lock = run_dir.WriterLock(workdir).acquire()
  with pytest.raises(run_dir.WorkdirBusyError, match=f'pid {os.getpid()}'):
    run_dir.WriterLock(workdir).acquire()
  lock.release()
