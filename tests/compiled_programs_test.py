"""Why a pytest worker died inside XLA:CPU's compiler, and what prevents it
(tests/compiled_programs.py, docs/testing.md).

The cause, reproduced in its exact condition: a process holding as many
memory maps as the kernel allows compiles a program, and XLA:CPU's code
loader fails and the process dies with SIGSEGV under
`backend_compile_and_load`. The prevention, through pytest as the suite
runs it: the programs a test module compiled are released when it ends."""

import os
import signal
import subprocess
import sys
import textwrap

from tests.run_helpers import REPO

AT_THE_LIMIT = """
import ctypes, mmap
import jax, jax.numpy as jnp
from tests.compiled_programs import map_limit, memory_maps

x = jnp.ones((16, 16))
jax.jit(lambda a: a + 1)(x).block_until_ready()  # the runtime's own maps
# Fill the process's maps to two below the limit: one reserved region,
# every other page of it made inaccessible (each such page splits it).
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [
  ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE
pages = 2 * (map_limit() - memory_maps()) + 2
no_reserve = 0x4000
base = libc.mmap(None, pages * page, mmap.PROT_READ,
                 mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | no_reserve, -1, 0)
for i in range((map_limit() - 2 - memory_maps()) // 2):
  assert libc.mprotect(base + (2 * i + 1) * page, page, 0) == 0
print('maps', memory_maps(), 'limit', map_limit(), flush=True)
kept = []
for i in range(20):
  f = jax.jit(lambda a, i=i: jnp.tanh(a * (i + 1.5)) @ a + i)
  kept.append(f.lower(x).compile())
print('compiled them all', flush=True)
"""


def test_a_process_out_of_memory_maps_dies_compiling():
  r = subprocess.run(
    [sys.executable, '-X', 'faulthandler', '-c', AT_THE_LIMIT],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert 'maps' in r.stdout, r.stderr[-3000:]
  assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr[-3000:])
  assert 'LLVM compilation error: Cannot allocate memory' in r.stderr
  assert 'in backend_compile_and_load' in r.stderr
  assert 'compiled them all' not in r.stdout


MODULE_THAT_COMPILES = """
import jax, jax.numpy as jnp
from tests.compiled_programs import memory_maps

FNS = [jax.jit(lambda a, i=i: jnp.tanh(a * (i + 1.5)) @ a + i)
       for i in range(50)]  # live for the whole run, as a module's are


def test_compiles_programs():
  before = memory_maps()
  for f in FNS:
    f(jnp.ones((16, 16))).block_until_ready()
  grown = memory_maps() - before
  assert grown >= 100, grown
  with open({record!r}, 'w') as out:
    out.write(str(memory_maps()))
"""

MODULE_AFTER_IT = """
from tests.compiled_programs import memory_maps


def test_the_programs_maps_are_gone():
  with open({record!r}) as f:
    left_by_the_module_before = int(f.read())
  assert memory_maps() <= left_by_the_module_before - 100
"""


def test_a_finished_module_releases_its_programs_maps(tmp_path):
  suite = tmp_path / 'suite'
  suite.mkdir()
  record = str(tmp_path / 'maps')
  for name, text in (
    ('a_compiles_test.py', MODULE_THAT_COMPILES),
    ('b_after_test.py', MODULE_AFTER_IT),
  ):
    (suite / name).write_text(textwrap.dedent(text.format(record=record)))
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'pytest',
      '-p',
      'tests.conftest',  # the suite's own fixtures
      '-p',
      'no:xdist',
      '-p',
      'no:cacheprovider',
      '-c',
      os.path.join(REPO, 'pyproject.toml'),
      '--rootdir',
      str(suite),
      str(suite),
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert '2 passed' in r.stdout.strip().splitlines()[-1], r.stdout[-3000:]
