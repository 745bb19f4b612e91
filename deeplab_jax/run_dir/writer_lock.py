"""`run.lock`: the one process that writes a workdir, taken and released
atomically, renewed while it is still ours, taken over from a dead holder."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from deeplab_jax import multihost
from deeplab_jax.errors import UserError

LOCK = 'run.lock'


class WorkdirBusyError(UserError):
  """Another live process trains in this workdir."""


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (telling a reused pid apart), or
  None where `/proc` does not say."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, another user's
  return start is None or _process_start(pid) in (None, start)


class WriterLock:
  """`WORKDIR/run.lock`: one training process writes a workdir.

  The lock names its holder (host, pid, start time) and a token of its
  own. It is stale when its holder is a process of this host that is no
  longer running, or, for a holder on another host (a shared file system),
  when its lease has not been renewed for `lease_s` seconds: a live holder
  renews it every `lease_s / 4` from a background thread.

  - Taking over a stale lock is atomic: the starter renames it aside (one
    rename of a file succeeds) and checks that what it moved is the lock
    it judged stale; if a new holder's lock was moved instead, it is put
    back and the start is refused.
  - Renewing touches the lock only while it still holds our token. A lock
    that is gone, holds another token, or cannot be renewed for half the
    lease is lost: `on_lost(message)` is called (training stops every
    process with that line: two runs never write one workdir).
  - `release` removes the lock only if it is ours, and the workdir if the
    lock created it and it is still empty. It runs on every exit the run
    controls, a lost peer's included (`multihost.on_exit`).
  """

  def __init__(
    self,
    workdir: str,
    lease_s: float = 120.0,
    on_lost: Callable[[str], None] | None = None,
  ):
    self.path = os.path.join(workdir, LOCK)
    self.workdir = workdir
    self.lease_s = lease_s
    self.token = uuid.uuid4().hex
    self._on_lost = on_lost or _raise_lost
    self._stop = threading.Event()
    self._thread = None
    self._created_dir = False
    self._held = False
    self._unregister = None

  def acquire(self) -> WriterLock:
    """Takes the lock, or raises `WorkdirBusyError` naming the live run."""
    self._created_dir = not os.path.isdir(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    me = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'start': _process_start(os.getpid()),
      'since': datetime.datetime.now(datetime.UTC).isoformat(
        timespec='seconds'
      ),
      'token': self.token,
    }
    for _ in range(3):  # a stale lock is moved aside, then raced for
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self._held = True
      self._stop.clear()
      self._thread = threading.Thread(target=self._renew, daemon=True)
      self._thread.start()
      self._unregister = multihost.on_exit(self.release)
      return self
    self._take_over_if_stale()  # raises, naming the holder
    raise WorkdirBusyError(f'could not lock {self.workdir}; try again')

  def _read(self) -> tuple[dict, bytes, float] | None:
    """`(holder, raw bytes, mtime)` of the lock file, None if absent."""
    try:
      with open(self.path, 'rb') as f:
        raw = f.read()
      renewed = os.path.getmtime(self.path)
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(raw)
    except ValueError:
      holder = {}  # being written, or damaged: judged by its lease
    return (holder if isinstance(holder, dict) else {}), raw, renewed

  def _take_over_if_stale(self) -> None:
    read = self._read()
    if read is None:
      return
    holder, raw, renewed = read
    here = holder.get('host') == socket.gethostname()
    if here and holder.get('pid') is not None:
      stale = not _alive(int(holder['pid']), holder.get('start'))
    else:
      stale = time.time() - renewed > self.lease_s
    if not stale:
      raise WorkdirBusyError(
        f'{self.workdir} is being trained by pid {holder.get("pid")} on '
        f'{holder.get("host")} since {holder.get("since")} ({self.path}); '
        'wait for it to finish, stop it, or use another --workdir'
      )
    aside = f'{self.path}.stale-{self.token}'
    try:
      os.rename(self.path, aside)  # atomic: one starter moves this file
    except FileNotFoundError:
      return  # another starter moved it first
    with open(aside, 'rb') as f:
      moved = f.read()
    if moved != raw:
      # A new holder's lock replaced the stale one after we read it.
      with contextlib.suppress(FileExistsError):
        os.link(aside, self.path)
    os.remove(aside)

  def holds(self) -> bool:
    """Whether the lock file is there and carries our token."""
    read = self._read()
    return read is not None and read[0].get('token') == self.token

  def _renew(self) -> None:
    failing_since = None
    while not self._stop.wait(self.lease_s / 4):
      read = self._read()
      if read is None or read[0].get('token') != self.token:
        holder = read[0] if read else {}
        by = (
          f'taken over by pid {holder.get("pid")} on {holder.get("host")}'
          if holder.get('token')
          else 'removed'
        )
        self._lost(f'the lock {self.path} was {by}')
        return
      try:
        os.utime(self.path)
        failing_since = None
      except OSError as e:
        failing_since = failing_since or time.monotonic()
        if time.monotonic() - failing_since > self.lease_s / 2:
          self._lost(f'the lock {self.path} cannot be renewed ({e})')
          return

  def _lost(self, why: str) -> None:
    self._held = False
    self._on_lost(
      f'{why}: another run may write {self.workdir}, so this one stops; '
      'make sure one run uses the workdir, then run the same command to '
      'resume from its last checkpoint'
    )

  def release(self) -> None:
    """Removes the lock if it is ours (never another run's)."""
    self._stop.set()
    if self._unregister is not None:
      self._unregister()
      self._unregister = None
    if self._held and self.holds():
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
    self._held = False
    if self._created_dir:
      try:
        os.rmdir(self.workdir)
      except OSError:
        pass  # not empty: the run wrote into it

  def __enter__(self) -> WriterLock:
    return self.acquire()

  def __exit__(self, *_) -> None:
    self.release()


def _raise_lost(message: str) -> None:
  """The default `on_lost` outside training: log it (a thread cannot
  raise into the main one)."""
  from absl import logging

  logging.error('%s', message)
