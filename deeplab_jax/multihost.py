"""Several processes (one per host): starting `jax.distributed`, and the
points where processes meet before a collective.

Why the meeting points: XLA:CPU's gloo collectives give a process a fixed
30 s (no setting in JAX 0.10) to join a collective that another process has
started for the first time; a host that is later by more than that (still
compiling, writing logs, evaluating more images) fails the run with "Gloo
context initialization failed: ... GetKeyValue() timed out". Processes that
may have drifted apart therefore first meet at a barrier of the coordination
service, whose timeout is ours.

A peer that dies (a killed process, a lost host) leaves the others blocked
in their next collective: gloo does not notice. JAX's coordination service
does when the peer's heartbeats stop, and its client then aborts every
other process with a C++ stack dump; a process that still exits normally
waits for the dead one at JAX's shutdown barrier. So every process runs a
watchdog thread: every `ALIVE_PERIOD_S` it writes a counter to the
coordination service's key-value store and reads the others'. A peer whose
counter stops for `PEER_TIMEOUT_S` (well inside JAX's heartbeat timeout,
`HEARTBEAT_TIMEOUT_S`), or a store that cannot be reached, ends the process
with one line (a peer stopped responding; restart every process with the
same command) and exit status 1, at once, without the shutdown barrier. A
process that finishes says so first (`finished`), so that its end is not
taken for a death. A collective that fails outright (gloo's "Connection
reset by peer" in a checkpoint write) ends the same way (`is_peer_failure`,
`PeerLostError`), not as a disk error. When the process that hosts the
coordination service (process 0) dies, JAX's client in the others ends
them first, within a second, with its own fatal message
(docs/distributed.md, "A process dies").
"""

from __future__ import annotations

import itertools
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
_ALIVE = 'deeplab_jax/alive/'
_DONE = 'done'
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
  if not (
    coordinator_address
    or num_processes
    or any(v in os.environ for v in ('SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES'))
  ):
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
  )
  if jax.process_count() > 1:
    _Watchdog().start()
  return True


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
  # A new line first: a progress bar may be mid-line.
  sys.stderr.write(f'\nerror: {peer_lost_message(cause)}\n')
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(1)


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


_finished = threading.Event()
_alive_lock = threading.Lock()  # no beat is written after `done`


def _client():
  from jax._src import distributed

  return distributed.global_state.client


class _Watchdog(threading.Thread):
  """Writes this process's sign of life and checks the others' (module
  docstring)."""

  def __init__(self):
    super().__init__(name='deeplab_jax peer watchdog', daemon=True)
    self.client = _client()
    self.index, self.count = jax.process_index(), jax.process_count()

  def run(self):
    seen: dict[int, tuple[str | None, float]] = {}
    start = time.monotonic()
    for beat in itertools.count(1):
      if _finished.wait(ALIVE_PERIOD_S):
        return
      try:
        with _alive_lock:
          if _finished.is_set():
            return
          self.client.key_value_set(
            f'{_ALIVE}{self.index}', str(beat), allow_overwrite=True
          )
        values = dict(self.client.key_value_dir_get(_ALIVE))
      except Exception as e:  # noqa: BLE001 - the store's host is gone
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        exit_peer_lost(f'the coordination service is unreachable: {first}')
      now = time.monotonic()
      for other in range(self.count):
        value = values.get(f'{_ALIVE}{other}')
        if other == self.index or value == _DONE:
          continue
        last, since = seen.get(other, (None, start))
        if value != last:
          seen[other] = (value, now)
        elif now - since > PEER_TIMEOUT_S:
          exit_peer_lost(
            f'process {other} sent no sign of life for {PEER_TIMEOUT_S} s'
          )


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
      start = time.perf_counter()
      self.fn.lower(*args).compile()  # cached: the call below reuses it
      self.compile_s = time.perf_counter() - start
      meet(self.name)
    return self.fn(*args)
