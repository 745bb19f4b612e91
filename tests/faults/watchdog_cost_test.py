"""The watchdog's cost per period with 16 processes on this machine: every
process writes its own key and reads one verdict, process 0 alone reads
the directory of keys, so a period costs 2N + 1 key-value calls for N
processes, and 2N - 1 keys are read (the figures in docs/distributed.md
come from this test's output)."""

import json
import os
import subprocess
import sys

import portpicker
import pytest

from tests.run_helpers import REPO, finish_all

# Several processes and injected faults: the slow tier.
pytestmark = pytest.mark.slow

PROBE = """
import json, sys, time
import jax
from deeplab_jax import multihost
multihost.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
multihost.meet('started')
time.sleep(float(sys.argv[4]))
w = multihost.watchdog['thread']
print(json.dumps({'periods': w.periods, 'calls': w.calls,
                  'keys_read': w.keys_read, 'busy_s': w.busy_s}))
multihost.meet('measured')
multihost.finished()
"""


def _measure(count, seconds):
  port = portpicker.pick_unused_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-c',
        PROBE,
        f'127.0.0.1:{port}',
        str(count),
        str(i),
        str(seconds),
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1'),
    )
    for i in range(count)
  ]
  results = finish_all(procs, timeout=600)
  out = []
  for code, stdout, stderr in results:
    assert code == 0, stderr[-3000:]
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  return out


def test_a_period_costs_2n_plus_1_calls_with_16_processes():
  count = 16
  stats = _measure(count, seconds=20)
  for index, s in enumerate(stats):
    assert s['periods'] >= 5, s
    # Process 0: its key, the directory, the verdict; the others: their
    # key and the verdict.
    assert s['calls'] == (3 if index == 0 else 2) * s['periods'], (index, s)
    # Keys read: process 0 the N signs of life, the others one verdict
    # each: 2N - 1 per period for the job, where every process reading
    # every key would be N * N.
    # (Process 0's first periods may see fewer keys: peers still starting.)
    if index == 0:
      assert count * (s['periods'] - 2) <= s['keys_read'], s
      assert s['keys_read'] <= count * s['periods'], s
    else:
      assert s['keys_read'] == s['periods'], (index, s)
  per_period_ms = [1000 * s['busy_s'] / s['periods'] for s in stats]
  print(
    f'watchdog, {count} processes: process 0 {per_period_ms[0]:.2f} ms per '
    f'period, the others {max(per_period_ms[1:]):.2f} ms at most (median '
    f'{sorted(per_period_ms[1:])[count // 2 - 1]:.2f} ms)'
  )
