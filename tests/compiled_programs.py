"""The memory maps a test process holds for its compiled programs.

XLA:CPU loads each compiled program's machine code into memory maps of its
own, kept while JAX caches the program. A pytest worker caches the programs
of every test it has run; at the kernel's per-process limit
(`vm.max_map_count`) XLA's code loader cannot map the next program, and the
error it raises for that kills the process with SIGSEGV inside
`backend_compile_and_load` (docs/testing.md). `release()` after each test
module (tests/conftest.py) keeps a worker far below the limit.
"""

import gc

import jax


def memory_maps() -> int:
  """How many memory maps this process holds now."""
  with open('/proc/self/maps') as f:
    return sum(1 for _ in f)


def map_limit() -> int:
  """The kernel's limit on memory maps per process."""
  with open('/proc/sys/vm/max_map_count') as f:
    return int(f.read())


def release() -> None:
  """Drops every program JAX has cached in this process, and with them the
  memory maps their code was loaded into."""
  jax.clear_caches()
  gc.collect()
