"""The suite's containment of a crashed worker (docs/testing.md): a test
whose process dies from a signal, as XLA:CPU's compiler has segfaulted
inside pytest workers, runs once more on a fresh worker; a test that
fails by raising is never rerun. Checked with pytest's own runner on the
repository's settings (pyproject.toml's `addopts`)."""

import os
import subprocess
import sys
import textwrap

from tests.run_helpers import REPO

CRASH_ONCE = """
import os, signal

def test_dies_once_then_passes(tmp_path_factory):
  mark = os.path.join({marks!r}, 'crashed')
  if not os.path.exists(mark):
    open(mark, 'w').close()
    os.kill(os.getpid(), signal.SIGSEGV)  # as the compiler's segfault

def test_fails_by_raising():
  raise AssertionError('a wrong result')
"""


def test_a_crashed_worker_reruns_its_test_and_a_failure_is_not_rerun(
  tmp_path,
):
  tests = tmp_path / 'suite'
  tests.mkdir()
  (tests / 'crash_test.py').write_text(
    textwrap.dedent(CRASH_ONCE.format(marks=str(tmp_path)))
  )
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'pytest',
      '-n',
      '1',
      '-p',
      'no:cacheprovider',
      '-c',
      os.path.join(REPO, 'pyproject.toml'),
      '--rootdir',
      str(tests),
      str(tests / 'crash_test.py'),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=str(tests),
  )
  summary = r.stdout.strip().splitlines()[-1]
  assert '1 failed, 1 passed, 1 rerun' in summary, r.stdout[-3000:]
  assert 'FAILED crash_test.py::test_fails_by_raising' in r.stdout
