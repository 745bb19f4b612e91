"""Test setup: 8 simulated CPU devices, set before JAX starts."""

import os
import tempfile

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
# Persistent compilation cache, shared with the subprocess runs: the same
# tiny programs are compiled by many tests.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  os.path.join(tempfile.gettempdir(), 'deeplab_jax_test_jit_cache'),
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Keep the 2-core CI machine responsive when two xdist workers run.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
# The test processes themselves compile without the persistent cache: XLA:CPU
# crashed twice (SIGSEGV) serialising or deserialising a cache entry inside
# a pytest worker (JAX 0.10, not reproducible alone). The subprocess runs
# of the scripts still share it through JAX_COMPILATION_CACHE_DIR.
jax.config.update('jax_enable_compilation_cache', False)

import pytest  # noqa: E402

from tests import compiled_programs  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Each test module's compiled programs are dropped when it ends: a
  worker that kept every program it compiled ran out of memory maps and
  XLA:CPU's compiler segfaulted (tests/compiled_programs.py)."""
  yield
  compiled_programs.release()


# ------------------------------------------------------ parity report ---
# `python -m pytest --parity-report=FILE.md` writes every
# figure the parity tests measured as Markdown tables (docs/parity.md is
# made from it). Each process appends JSON lines; the controlling process
# (the only one without xdist's `workerinput`) renders them at the end.

import json  # noqa: E402


def pytest_addoption(parser):
  parser.addoption(
    '--parity-report',
    default=None,
    metavar='FILE.md',
    help='write the figures measured by the parity tests to FILE.md',
  )


def _records_path(config):
  path = config.getoption('--parity-report')
  return path and os.path.abspath(path) + '.jsonl'


def pytest_sessionstart(session):
  path = _records_path(session.config)
  if path and not hasattr(session.config, 'workerinput'):
    open(path, 'w').close()


@pytest.fixture
def parity_report(request):
  """`parity_report(table, **row)`: one row of a parity table (floats are
  relative errors, written as 1.2e-06); a no-op without --parity-report."""
  path = _records_path(request.config)

  def record(table, **row):
    if path:
      with open(path, 'a') as f:
        f.write(json.dumps({'table': table, 'row': row}) + '\n')

  return record


def pytest_sessionfinish(session):
  path = _records_path(session.config)
  if not path or hasattr(session.config, 'workerinput'):
    return
  tables = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      tables.setdefault(rec['table'], []).append(rec['row'])
  cell = lambda v: f'{v:.1e}' if isinstance(v, float) else str(v)
  out = []
  for table in sorted(tables):
    rows = sorted(tables[table], key=lambda r: [cell(v) for v in r.values()])
    header = list(rows[0])
    out += [f'### {table}', '', '| ' + ' | '.join(header) + ' |']
    out.append('|' + '---|' * len(header))
    out += [
      '| ' + ' | '.join(cell(r.get(k, '')) for k in header) + ' |' for r in rows
    ]
    out.append('')
  with open(session.config.getoption('--parity-report'), 'w') as f:
    f.write('\n'.join(out))
  os.remove(path)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A prepared synthetic_shapes data set (the smoke recipes' data)."""
  from deeplab_jax.data import datasets

  d = str(tmp_path_factory.mktemp('tfds'))
  datasets.prepare('synthetic_shapes', data_dir=d)
  return d
