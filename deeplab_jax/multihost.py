"""Several processes (one per host): starting `jax.distributed`, and the
points where processes meet before a collective.

Why the meeting points: XLA:CPU's gloo collectives give a process a fixed
30 s (no setting in JAX 0.10) to join a collective that another process has
started for the first time; a host that is later by more than that (still
compiling, writing logs, evaluating more images) fails the run with "Gloo
context initialization failed: ... GetKeyValue() timed out". Processes that
may have drifted apart therefore first meet at a barrier of the coordination
service, whose timeout is ours.

Decisions that can stop a run are taken once and every process learns
them (`decide`): a refusal at start (the workdir's lock and run record, the
config, the data) is published through the coordination service's
key-value store, and every process raises the same one-line error within
seconds, instead of one process exiting while the others wait at their
next meeting.

A peer that dies (a killed process, a lost host) leaves the others blocked
in their next collective: gloo does not notice. JAX's coordination service
does when the peer's heartbeats stop, and its client then aborts every
other process with a C++ stack dump; a process that still exits normally
waits for the dead one at JAX's shutdown barrier. So every process runs a
watchdog thread (`_Watchdog`): every `ALIVE_PERIOD_S` it writes its sign of
life and the step it is at to the key-value store, and reads one verdict.
Process 0 alone reads every process's key (one directory read) and writes
the verdict: O(N) calls per period for N processes, not N^2. The verdict
stops every process, each with the same one line and exit status 1, at
once, without the shutdown barrier, when

- a peer's sign of life stops for `PEER_TIMEOUT_S` (well inside JAX's
  heartbeat timeout, `HEARTBEAT_TIMEOUT_S`), or process 0's verdict does;
- a peer hangs: its step stays behind the others' for `hang_timeout_s`
  (`train.hang_timeout_s`) while they wait for it; a long compile,
  evaluation or checkpoint write holds every process at the same step and
  is not a hang;
- a process asks to stop the job (`stop_job`: e.g. its workdir lock was
  taken over).

A key-value call that fails is retried until `PEER_TIMEOUT_S` has passed
before the store counts as unreachable. A process that finishes says so
first (`finished`), so that its end is not taken for a death. A
collective that fails outright (gloo's "Connection reset by peer" in a
checkpoint write) ends the same way (`is_peer_failure`, `PeerLostError`),
not as a disk error. When the process that hosts the coordination service
(process 0) dies, JAX's client in the others ends them first, within a
second, with its own fatal message (docs/distributed.md, "A process
dies"). Exit callbacks (`on_exit`, e.g. releasing the workdir lock) run on
every exit this module takes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from deeplab_jax.errors import UserError

# A host may wait this long for a slower one (a first compile of a large
# model on a loaded machine, a long evaluation) before the run fails.
MEET_TIMEOUT_S = 1800
# A peer silent this long is dead to the others, which then exit: the
# bound a user waits (docs/distributed.md, "A process dies"). Well above
# the stalls of a loaded host.
PEER_TIMEOUT_S = 30
# JAX's own: the coordination service declares a task dead after this and
# aborts the others; it must leave the watchdog time to end them first
# (seen: the abort 51-68 s after a SIGKILL with JAX's default of 100 s).
HEARTBEAT_TIMEOUT_S = 150
ALIVE_PERIOD_S = 2
# A peer whose step stays behind the others' this long hangs
# (`train.hang_timeout_s` sets it for a run).
DEFAULT_HANG_TIMEOUT_S = 1800
_ALIVE = 'deeplab_jax/alive/'
_VERDICT = 'deeplab_jax/verdict'
_DONE = 'done'
_STOP = 'stop'
_STOPPED = 'stopped'  # a process read the stop verdict and exits
_LOST = 'lost'
_RESTART = (
  'restart every process with the same command; the run resumes from its '
  'last checkpoint'
)

_meetings = itertools.count()


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Starts `jax.distributed` when flags name a coordinator or process count,
  or a cluster (SLURM, Cloud TPU) is detected; returns whether it did."""
  # A TPU_WORKER_HOSTNAMES of one host is a single-host job (deeplab_jax
  # names 'localhost' there on a host without a TPU to keep libtpu quiet).
  tpu_workers = os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')
  if not (
    coordinator_address
    or num_processes
    or 'SLURM_NTASKS' in os.environ
    or len(tpu_workers) > 1
  ):
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
  )
  if jax.process_count() > 1:
    watchdog['thread'] = _Watchdog()
    watchdog['thread'].start()
  return True


# The running `_Watchdog` (its `periods`, `calls`, `keys_read` and `busy_s`
# give its cost; docs/distributed.md).
watchdog: dict[str, Any] = {}


class PeerLostError(UserError):
  """Another process of the job stopped responding."""


def peer_lost_message(cause: str) -> str:
  """The one line a process prints when a peer is lost."""
  cause = ' '.join(cause.split())[:160]
  return (
    f'process {jax.process_index()} of {jax.process_count()}: another '
    f'process of the job stopped responding ({cause}); this one stops too. '
    f'{_RESTART[0].upper()}{_RESTART[1:]}'
  )


def is_peer_failure(error: BaseException) -> bool:
  """Whether `error` is a collective or coordination failure caused by a
  lost peer (multi-process runs only)."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return False
  return bool(
    re.search(
      r'Gloo|Connection reset by peer|Connection closed by peer|'
      r'stopped sending heartbeats|unhealthy',
      str(error),
    )
  )


def exit_peer_lost(cause: str) -> None:
  """Prints `peer_lost_message(cause)` and exits 1 now: not through JAX's
  shutdown barrier, which would wait for the dead peer and then abort."""
  _exit_now(peer_lost_message(cause))


def _exit_now(message: str) -> None:
  """Runs the exit callbacks, prints `error: message` and exits 1 at once."""
  for callback in reversed(_exit_callbacks):
    try:
      callback()
    except Exception:  # noqa: BLE001 - exiting anyway; the line matters
      pass
  # A new line first: a progress bar may be mid-line.
  sys.stderr.write(f'\nerror: {message}\n')
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(1)


_exit_callbacks: list[Callable[[], None]] = []


def on_exit(callback: Callable[[], None]) -> Callable[[], None]:
  """Registers `callback` to run when this module ends the process (a lost
  peer, a hang, a stop verdict); returns a function that unregisters it."""
  _exit_callbacks.append(callback)
  return lambda: (
    callback in _exit_callbacks and _exit_callbacks.remove(callback)
  )


def finished() -> None:
  """Tells the other processes that this one ends normally (its silence
  from now on is not a death). Call at the end of a successful job."""
  client = _client()
  if client is not None:
    with _alive_lock:
      _finished.set()
      client.key_value_set(
        f'{_ALIVE}{jax.process_index()}', _DONE, allow_overwrite=True
      )
      if jax.process_index() == 0:
        client.key_value_set(_VERDICT, _DONE, allow_overwrite=True)


def at_step(step: int) -> None:
  """Records the step this process has reached (the watchdog publishes it,
  so a peer that stays behind while the others wait is found)."""
  _progress['step'] = step


@contextlib.contextmanager
def busy(phase: str):
  """Marks work that may keep this process behind its peers for long
  without hanging (a compile, an evaluation, a checkpoint write): while it
  runs, the process is never judged hung."""
  before = _progress['phase']
  _progress['phase'] = phase
  try:
    yield
  finally:
    _progress['phase'] = before


def stop_job(message: str) -> None:
  """Ends every process of the job with `message` (one line, exit 1): this
  process now, the others through the watchdog's next verdict."""
  client = _client()
  with _alive_lock:  # no sign of life overwrites the request
    if client is not None and jax.process_count() > 1:
      key, value = f'{_ALIVE}{jax.process_index()}', f'{_STOP}|{message}'
      if jax.process_index() == 0:
        key, value = _VERDICT, f'-1|{_STOP}|{message}'
      with contextlib.suppress(Exception):  # exiting anyway
        client.key_value_set(key, value, allow_overwrite=True)
        if jax.process_index() == 0:
          _await_acks(client, jax.process_count())
    _exit_now(message)


def _await_acks(client, count: int) -> None:
  """Process 0, having published a stop verdict: waits until every other
  process has read it (or, silent since the verdict for two periods, is
  dead). It hosts the coordination service, whose end would abort the
  others before they could say why. At most two periods and 5 s."""
  start = time.monotonic()
  first = None
  while time.monotonic() - start < 2 * ALIVE_PERIOD_S + 5:
    with contextlib.suppress(Exception):
      values = dict(client.key_value_dir_get(_ALIVE))
      first = first or values
      silent_long = time.monotonic() - start > 2 * ALIVE_PERIOD_S
      if all(
        values.get(f'{_ALIVE}{p}', '').partition('|')[0]
        in (_DONE, _STOPPED, _STOP)
        or (
          silent_long
          and values.get(f'{_ALIVE}{p}') == first.get(f'{_ALIVE}{p}')
        )
        for p in range(1, count)
      ):
        return
    time.sleep(0.1)


_finished = threading.Event()
_alive_lock = threading.Lock()  # no beat is written after `done`
_progress = {'step': -1, 'phase': ''}
# `train.hang_timeout_s`, set by training (`set_hang_timeout`).
_hang = {'timeout_s': DEFAULT_HANG_TIMEOUT_S}


def set_hang_timeout(seconds: float) -> None:
  """How long a peer may stay behind the others' step (`train.
  hang_timeout_s`) before the job ends naming it."""
  _hang['timeout_s'] = seconds


def _client():
  from jax._src import distributed

  return distributed.global_state.client


def _retrying(call: Callable[[], Any], what: str) -> Any:
  """`call()`, retried for up to `PEER_TIMEOUT_S` (a store that answers
  late is not a dead one); then the process ends as peer-lost."""
  deadline = time.monotonic() + PEER_TIMEOUT_S
  delay = 0.25
  while True:
    try:
      return call()
    except Exception as e:  # noqa: BLE001 - the store's errors are generic
      if time.monotonic() + delay > deadline:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        exit_peer_lost(
          f'the coordination service is unreachable ({what}): {first}'
        )
      time.sleep(delay)
      delay = min(2 * delay, 4.0)


class _Watchdog(threading.Thread):
  """Signs of life, steps and the verdict (module docstring)."""

  def __init__(self):
    super().__init__(name='deeplab_jax peer watchdog', daemon=True)
    self.client = _client()
    self.index, self.count = jax.process_index(), jax.process_count()
    # Its cost: periods run, key-value calls made, keys read, seconds.
    self.periods, self.calls, self.keys_read, self.busy_s = 0, 0, 0, 0.0
    start = time.monotonic()
    # Process 0: per peer, the last value and step seen and when each
    # changed; the others: process 0's last verdict and when it changed.
    self.seen = {p: (None, start, None, start) for p in range(self.count)}
    self.verdict_seen = (None, start)

  def run(self):
    for beat in itertools.count(1):
      if _finished.wait(ALIVE_PERIOD_S):
        return
      start = time.perf_counter()
      self._period(beat)
      self.periods += 1
      self.busy_s += time.perf_counter() - start

  def _period(self, beat: int) -> None:
    with _alive_lock:
      if _finished.is_set():
        return
      self._call(
        lambda b=beat: self.client.key_value_set(
          f'{_ALIVE}{self.index}',
          f'{b}|{_progress["step"]}|{_progress["phase"]}',
          allow_overwrite=True,
        ),
        "writing this process's sign of life",
      )
    if self.index == 0:
      self._judge(beat)
    else:
      self._obey()

  def _call(self, fn, what):
    self.calls += 1
    return _retrying(fn, what)

  def _judge(self, beat: int) -> None:
    """Process 0: reads every sign of life, writes the verdict."""
    values = dict(
      self._call(
        lambda: self.client.key_value_dir_get(_ALIVE), 'reading the peers'
      )
    )
    self.keys_read += len(values)
    verdict = verdict_of(values, self.seen, time.monotonic(), self.count)
    with _alive_lock:
      if _finished.is_set():
        return
      self._call(
        lambda: self.client.key_value_set(
          _VERDICT, f'{beat}|{verdict or "ok"}', allow_overwrite=True
        ),
        'writing the verdict',
      )
    if verdict:
      _await_acks(self.client, self.count)
      _exit_for(verdict)

  def _obey(self) -> None:
    """The other processes: act on process 0's verdict."""
    value = self._call(self._try_verdict, 'reading the verdict')
    self.keys_read += 1
    now = time.monotonic()
    if value == _DONE:
      _finished.set()  # process 0 ended normally: nobody left to judge
      return
    beat, _, verdict = (value or '').partition('|')
    if verdict != 'ok' and verdict:
      with _alive_lock, contextlib.suppress(Exception):
        self.client.key_value_set(
          f'{_ALIVE}{self.index}', _STOPPED, allow_overwrite=True
        )
      _exit_for(verdict)
    last, since = self.verdict_seen
    if beat != last:
      self.verdict_seen = (beat, now)
    elif now - since > PEER_TIMEOUT_S:
      exit_peer_lost(f'process 0 sent no verdict for {PEER_TIMEOUT_S} s')

  def _try_verdict(self) -> str | None:
    try:
      return self.client.key_value_try_get(_VERDICT)
    except Exception as e:
      if 'NOT_FOUND' in str(e):  # process 0 has not judged yet
        return None
      raise


def _exit_for(verdict: str) -> None:
  """Ends this process as `verdict` (`lost|cause` or `stop|message`) says."""
  kind, _, text = verdict.partition('|')
  if kind == _LOST:
    exit_peer_lost(text)
  _exit_now(text)


def verdict_of(values, seen, now, count) -> str | None:
  """Process 0's verdict from the signs of life `values` (`{key:
  'beat|step|phase'}`, or `done`, `stopped`, `stop|message`), updating
  `seen` (per process: value, when it changed, progress, when it changed):
  `lost|cause`, `stop|message`, or None when all is well. A process in a
  `busy` phase (compiling, evaluating, checkpointing) is never hung."""
  steps, idle = {}, set()
  for p in range(count):
    value = values.get(f'{_ALIVE}{p}')
    if value in (_DONE, _STOPPED):
      continue
    if value is not None and value.startswith(f'{_STOP}|'):
      return value
    last, since, progress, progress_since = seen[p]
    if value != last:
      since = now
    now_progress = None if value is None else value.split('|', 1)[1]
    if now_progress != progress:
      progress_since = now
    seen[p] = (value, since, now_progress, progress_since)
    if p != 0 and now - since > PEER_TIMEOUT_S:
      return f'{_LOST}|process {p} sent no sign of life for {PEER_TIMEOUT_S} s'
    if now_progress is not None:
      step, _, phase = now_progress.partition('|')
      steps[p] = int(step)
      if not phase:
        idle.add(p)
  if steps and len(set(steps.values())) > 1:
    ahead = max(steps.values())
    behind = sorted(
      p
      for p in idle
      if steps[p] < ahead and now - seen[p][3] > _hang['timeout_s']
    )
    if behind:
      at = ', '.join(f'process {p} at step {steps[p] + 1}' for p in behind)
      return (
        f'{_STOP}|{at} made no progress for {_hang["timeout_s"]:.0f} s while '
        f'the others wait at step {ahead + 1} (train.hang_timeout_s): it hangs '
        f'(a stalled file system, a stuck input pipeline); every process '
        f'stops. {_RESTART[0].upper()}{_RESTART[1:]}'
      )
  return None


_exchanges = itertools.count()


def gather(name: str, value: str) -> list[str]:
  """Every process's `value`, in process order (`[value]` with one
  process). Every process must call it at the same point, in the same
  order; it waits up to `MEET_TIMEOUT_S` for the others."""
  if jax.process_count() == 1:
    return [value]
  client = _client()
  key = f'deeplab_jax/exchange/{next(_exchanges)}.{name}/'
  client.key_value_set(f'{key}{jax.process_index()}', value)
  return [
    client.blocking_key_value_get(f'{key}{p}', MEET_TIMEOUT_S * 1000)
    for p in range(jax.process_count())
  ]


def decide(
  name: str, check: Callable[[], Any], *, every_process: bool = False
) -> None:
  """Runs `check` once and makes every process act on its verdict: a
  `UserError` it raises is raised by every process, with the same line.

  Every process must call `decide` at the same point, in the same order.
  `every_process=False`: process 0 alone runs `check` (it owns the workdir:
  lock, run record); the others wait for its verdict. `every_process=True`:
  each process checks what only it sees (its data files), and the failure
  of the lowest-numbered process is everyone's, prefixed with its index.
  Another exception in `check` is re-raised where it happened and ends the
  others with one line naming it. With one process, `check()` simply runs.
  """
  if jax.process_count() == 1:
    check()
    return
  index = jax.process_index()
  failure, outcome = None, 'ok'
  if every_process or index == 0:
    try:
      check()
    except UserError as e:
      failure, outcome = e, str(e)
    except Exception as e:
      failure = e
      outcome = f'{name} failed on process {index}: {_one_line(e)}'
  outcomes = gather(name, json.dumps(outcome))
  for p, value in enumerate(outcomes if every_process else outcomes[:1]):
    message = json.loads(value)
    if message == 'ok':
      continue
    if p == index and failure is not None and not every_process:
      raise failure  # its own type and traceback where it happened
    if every_process:
      message = f'process {p} of {jax.process_count()}: {message}'
    raise UserError(message) from failure


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:200]}'


def meet(name: str, timeout_s: int = MEET_TIMEOUT_S) -> None:
  """Blocks until every process has called `meet` as often as this one
  (no-op with one process). Every process must call it in the same order."""
  if jax.process_count() == 1:
    return
  key = f'deeplab_jax.{name}.{next(_meetings)}'
  ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


class CompiledOnFirstCall:
  """A jitted function whose first call compiles it, timed (`compile_s`;
  a persistent-cache hit makes it short), then meets the other processes
  before running it: compile times differ between hosts by more than the
  collectives' 30 s. Later calls are the function's own."""

  def __init__(self, fn: Callable[..., Any], name: str):
    self.fn = fn
    self.name = name
    self.compile_s: float | None = None

  def __call__(self, *args):
    if self.compile_s is None:
      with busy('compiling'):
        start = time.perf_counter()
        self.fn.lower(*args).compile()  # cached: the call below reuses it
        self.compile_s = time.perf_counter() - start
        meet(self.name)
        # A compile shorter than the persistent cache's threshold is not
        # cached: this first call may compile again.
        return self.fn(*args)
    return self.fn(*args)
