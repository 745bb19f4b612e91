"""A run's directory: the config it belongs to (`config.json`), its
metrics log (`metrics.jsonl` and TensorBoard events in `tb/`), its last
evaluation, and the lock of the one process that writes it (`run.lock`).
Checkpoints (`checkpoints/`) are `checkpointing`'s."""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from typing import Any

import ml_collections
from etils import epath
from tensorboardX import SummaryWriter

from deeplab_jax import step_options
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

  The lock names its holder (host, pid, start time). It is stale, and
  taken over, when its holder is a process of this host that is no longer
  running, or, for a holder on another host (a shared file system), when
  its lease has not been renewed for `lease_s` seconds: a live holder
  renews it every `lease_s / 4` from a background thread. `release`
  removes it (and the workdir, if the lock created it and it is empty).
  """

  def __init__(self, workdir: str, lease_s: float = 120.0):
    self.path = os.path.join(workdir, LOCK)
    self.workdir = workdir
    self.lease_s = lease_s
    self._stop = threading.Event()
    self._thread = None
    self._created_dir = False

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
    }
    for _ in range(3):  # a stale lock is removed, then raced for
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        self._clear_if_stale()
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self._thread = threading.Thread(target=self._renew, daemon=True)
      self._thread.start()
      return self
    self._clear_if_stale()  # raises, naming the holder
    raise WorkdirBusyError(f'could not lock {self.workdir}; try again')

  def _clear_if_stale(self) -> None:
    try:
      with open(self.path) as f:
        holder = json.load(f)
      renewed = os.path.getmtime(self.path)
    except FileNotFoundError:
      return
    except (OSError, ValueError):
      holder, renewed = {}, os.path.getmtime(self.path)
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
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_s / 4):
      try:
        os.utime(self.path)
      except OSError:
        return

  def release(self) -> None:
    """Removes the lock (this process's)."""
    self._stop.set()
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    if self._created_dir:
      try:
        os.rmdir(self.workdir)
      except OSError:
        pass  # not empty: the run wrote into it

  def __enter__(self) -> WriterLock:
    return self.acquire()

  def __exit__(self, *_) -> None:
    self.release()


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
