"""A run's directory: the config it belongs to (`config.json`), its
metrics log (`metrics.jsonl` and TensorBoard events in `tb/`), its last
evaluation, and the lock of the one process that writes it (`run.lock`).
Checkpoints (`checkpoints/`) are `checkpointing`'s."""

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
from typing import Any

import ml_collections
from etils import epath
from tensorboardX import SummaryWriter

from deeplab_jax import multihost, step_options
from deeplab_jax.errors import ConfigError, UserError

# Config groups whose change makes a workdir's checkpoints incompatible.
RUN_IDENTITY = ('model', 'data.dataset', 'data.crop_size', 'train.batch_size')
# How the step is computed, not what it computes (`step_options`): a run
# resumes with these changed (and from workdirs written before they existed).
COMPUTE_ONLY = step_options.COMPUTE_ONLY
# Where and how long a run goes on, not what it trains: a resume may change
# these too. Each change is appended to `resumed.jsonl`; `config.json`
# keeps the values the run started with. Any other change is refused.
RESUMABLE = COMPUTE_ONLY + (
  'train.num_steps',
  'train.log_every_steps',
  'train.hang_timeout_s',
  'eval.every_steps',
  'eval.batch_size',
  'checkpoint',
  'data.data_dir',
  'data.num_workers',
  'mesh',
)
RESUMED = 'resumed.jsonl'


def _in(key: str, groups) -> bool:
  return any(key == g or key.startswith(g + '.') for g in groups)


def _flat_config(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_config(v, f'{prefix}.{k}' if prefix else k))
  return out


def is_remote(workdir: str) -> bool:
  """Whether `workdir` is on remote storage (`gs://...`, any `scheme://`)."""
  return '://' in workdir


def check_path(workdir: str) -> None:
  """Refuses a workdir that is a file, or lies under one (local paths)."""
  if is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(
      f'--workdir {workdir} is a file, not a folder; pass a folder (new or '
      'one a run of this config wrote)'
    )
  parent = os.path.dirname(path)
  while parent != os.path.dirname(parent) and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(
      f'--workdir {workdir} lies under {parent}, which is a file; pass a '
      'folder path'
    )


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run of another config, naming each
  differing key with both values. Writes nothing: `claim` does,
  once training starts, so a run that fails before its first step (no
  data, a bad `init_from`) leaves the workdir free for the fixed command."""
  ours, theirs = _configs(config, workdir)
  if theirs is None:
    return
  identity = lambda key: key not in COMPUTE_ONLY and _in(key, RUN_IDENTITY)
  diff = [
    f'{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now'
    for k in sorted(set(ours) | set(theirs))
    if identity(k) and ours.get(k) != theirs.get(k)
  ]
  if diff:
    raise ConfigError(
      f'{workdir} holds a run of another config ({"; ".join(diff)}); use '
      'a new --workdir or the same config'
    )
  # Keys a newer version added are not changes of an older workdir's run.
  changed = [
    f'{k}: {theirs[k]!r} there, {ours.get(k)!r} now'
    for k in sorted(theirs)
    if not _in(k, RESUMABLE) and ours.get(k) != theirs[k]
  ]
  if changed:
    raise ConfigError(
      f'{workdir} was trained with other settings ({"; ".join(changed)}); '
      'resume with the recorded values (config.json) or use a new --workdir'
    )


def _configs(config, workdir):
  """`(ours, the workdir's or None)`, flattened to dotted keys."""
  ours = _flat_config(json.loads(config.to_json_best_effort()))
  path = epath.Path(workdir, 'config.json')
  if not path.exists():
    return ours, None
  return ours, _flat_config(json.loads(path.read_text()))


def claim(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config into the workdir (training has started);
  a resume that changed `RESUMABLE` keys appends them, with both values,
  to `resumed.jsonl` and leaves `config.json` as the run started."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  ours, theirs = _configs(config, workdir)
  if theirs is None:
    epath.Path(workdir, 'config.json').write_text(
      json.dumps(json.loads(config.to_json_best_effort()), indent=2)
    )
    return
  changed = {
    k: [theirs.get(k), ours[k]]
    for k in sorted(ours)
    if k in theirs and ours[k] != theirs[k]
  }
  if changed:
    record = {
      'time': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'changed': changed,
    }
    with epath.Path(workdir, RESUMED).open('a') as f:
      f.write(json.dumps(record) + '\n')


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


def last_evaluation(workdir: str) -> dict[str, Any] | None:
  """The last evaluation record of `metrics.jsonl`, if any."""
  path = epath.Path(workdir, 'metrics.jsonl')
  if not path.exists():
    return None
  last = None
  for line in path.read_text().splitlines():
    record = json.loads(line) if line.strip() else {}
    if 'miou' in record:
      last = record
  return last


class MetricsLog:
  """metrics.jsonl (appended across resumes) + TensorBoard, process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._writer = None
    if enabled:
      self._jsonl = epath.Path(workdir, 'metrics.jsonl').open('a')
      self._writer = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': step}
    for k, v in values.items():
      if isinstance(v, dict):
        record[k] = v
        for name, x in v.items():
          if x == x:  # not NaN
            self._writer.add_scalar(f'{k}/{name}', x, step)
      else:
        record[k] = float(v)
        self._writer.add_scalar(k, float(v), step)
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._writer.close()

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *_) -> None:
    self.close()
