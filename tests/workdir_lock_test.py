"""A workdir has one writer: a second `scripts.train` on a live workdir is
refused at once, a lock left by a dead process does not block, and a lock
of another host expires as a lease."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import time

import pytest

from deeplab_jax.run_dir import writer_lock
from tests.run_helpers import run_python, train_cmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(workdir, data_dir):
  return subprocess.Popen(
    train_cmd(workdir, data_dir),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_killed_ones_lock_does_not_block(
  data_dir, tmp_path
):
  workdir = str(tmp_path / 'w')
  lock = os.path.join(workdir, writer_lock.LOCK)
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
  path = os.path.join(workdir, writer_lock.LOCK)
  holder = {'host': 'elsewhere', 'pid': 1, 'since': '2026-01-01T00:00:00'}
  with open(path, 'w') as f:
    json.dump(holder, f)
  with pytest.raises(writer_lock.WorkdirBusyError, match='pid 1 on elsewhere'):
    writer_lock.WriterLock(workdir, lease_s=60).acquire()
  old = time.time() - 61
  os.utime(path, (old, old))  # not renewed for longer than the lease
  lock = writer_lock.WriterLock(workdir, lease_s=60).acquire()
  with open(path) as f:
    assert json.load(f)['pid'] == os.getpid()
  # A live holder renews its lease: the file's time moves.
  renewing = writer_lock.WriterLock(str(tmp_path / 'v'), lease_s=0.4).acquire()
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
  with open(os.path.join(workdir, writer_lock.LOCK), 'w') as f:
    json.dump(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'start': '1'}, f
    )
  writer_lock.WriterLock(workdir).acquire().release()
  # The same start time: a live holder, refused.
  lock = writer_lock.WriterLock(workdir).acquire()
  with pytest.raises(writer_lock.WorkdirBusyError, match=f'pid {os.getpid()}'):
    writer_lock.WriterLock(workdir).acquire()
  lock.release()


def _stale_lock(workdir):
  """A lock left by a process of this host that is no longer running."""
  dead = subprocess.Popen(['true'])
  dead.wait()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, writer_lock.LOCK), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': dead.pid, 'start': '1'}, f)


def _racer(workdirs, ready, tried, results):
  """One starter, for each workdir in turn: waits until the stale lock is
  there and every starter is ready, tries the lock, reports, and releases a
  won lock once every starter has tried."""
  for workdir in workdirs:
    ready.wait()
    try:
      lock = writer_lock.WriterLock(workdir).acquire()
      results.put((workdir, 'won'))
    except writer_lock.WorkdirBusyError:
      lock = None
      results.put((workdir, 'busy'))
    tried.wait()
    if lock is not None:
      lock.release()


def test_racing_starters_take_a_stale_lock_once(tmp_path):
  """Starters that all find the same stale lock: exactly one wins, every
  time (each starter a process of its own, 25 races)."""
  ctx = multiprocessing.get_context('spawn')  # JAX's threads forbid fork
  starters = 4
  workdirs = [str(tmp_path / f'w{attempt}') for attempt in range(25)]
  ready, tried = ctx.Barrier(starters + 1), ctx.Barrier(starters + 1)
  results = ctx.Queue()
  procs = [
    ctx.Process(target=_racer, args=(workdirs, ready, tried, results))
    for _ in range(starters)
  ]
  for p in procs:
    p.start()
  try:
    for workdir in workdirs:
      _stale_lock(workdir)
      ready.wait(timeout=120)
      outcomes = sorted(results.get(timeout=60) for _ in range(starters))
      tried.wait(timeout=60)
      assert outcomes == [(workdir, 'busy')] * (starters - 1) + [
        (workdir, 'won')
      ], outcomes
  finally:
    for p in procs:
      p.join(timeout=60)
      if p.is_alive():
        p.kill()
  for workdir in workdirs:
    # Released, and nothing of the takeover is left beside the lock.
    assert os.listdir(workdir) == [], workdir


def test_renewal_stops_a_run_whose_lock_was_taken_over(tmp_path):
  lost = []
  lock = writer_lock.WriterLock(
    str(tmp_path / 'w'), lease_s=0.4, on_lost=lost.append
  ).acquire()
  with open(lock.path, 'w') as f:
    json.dump({'host': 'elsewhere', 'pid': 7, 'token': 'theirs'}, f)
  deadline = time.time() + 5
  while not lost and time.time() < deadline:
    time.sleep(0.05)
  [message] = lost
  assert message.startswith(
    f'the lock {lock.path} was taken over by pid 7 on elsewhere: another '
    'run may write'
  )
  assert 'run the same command to resume' in message
  # Release leaves the other run's lock alone.
  lock.release()
  with open(lock.path) as f:
    assert json.load(f)['token'] == 'theirs'


def test_release_never_removes_another_runs_lock(tmp_path):
  lock = writer_lock.WriterLock(str(tmp_path / 'w')).acquire()
  os.remove(lock.path)
  with open(lock.path, 'w') as f:
    json.dump({'host': 'elsewhere', 'pid': 7, 'token': 'theirs'}, f)
  lock.release()
  assert os.path.exists(lock.path)


def test_a_peer_lost_exit_releases_the_lock(tmp_path):
  """The peer-lost path ends a process with `os._exit`; its lock goes with
  it, so the restart the message recommends is not refused, even where
  the holder could only be judged by its lease (another host)."""
  workdir = str(tmp_path / 'w')
  script = (
    'from deeplab_jax import multihost\n'
    'from deeplab_jax.run_dir import writer_lock\n'
    f'writer_lock.WriterLock({workdir!r}).acquire()\n'
    "multihost.exit_peer_lost('process 1 sent no sign of life for 30 s')\n"
  )
  r = run_python(['-c', script], JAX_PLATFORMS='cpu')
  assert r.returncode == 1
  assert 'another process of the job stopped responding' in r.stderr
  assert not os.path.exists(os.path.join(workdir, writer_lock.LOCK))
  writer_lock.WriterLock(workdir, lease_s=3600).acquire().release()
