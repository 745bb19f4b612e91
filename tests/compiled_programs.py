"""The memory maps a test process holds for its compiled programs.

XLA:CPU loads each compiled program's machine code into memory maps of its
own, kept while JAX caches the program (`deeplab_jax/program_memory.py`
counts them). A pytest worker caches the programs of every test it has
run; at the kernel's per-process limit (`vm.max_map_count`) XLA's code
loader cannot map the next program, and the error it raises for that kills
the process with SIGSEGV inside `backend_compile_and_load`
(docs/testing.md). `release()` after each test module (tests/conftest.py)
keeps a worker far below the limit; `fill_memory_maps` puts a process near
it, to test what happens there.
"""

import ctypes
import gc
import mmap

import jax

from deeplab_jax.program_memory import map_limit, memory_maps


def release() -> None:
  """Drops every program JAX has cached in this process, and with them the
  memory maps their code was loaded into."""
  jax.clear_caches()
  gc.collect()


def fill_memory_maps(leave: int) -> None:
  """Takes this process's memory maps to `leave` below the kernel's limit:
  one reserved region (no memory behind it), every other page of it made
  inaccessible, which splits it into one map per page."""
  libc = ctypes.CDLL(None, use_errno=True)
  libc.mmap.restype = ctypes.c_void_p
  libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3
  libc.mmap.argtypes.append(ctypes.c_long)
  libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  page, no_reserve, no_access = mmap.PAGESIZE, 0x4000, 0
  pages = 2 * (map_limit() - memory_maps()) + 2
  flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | no_reserve
  base = libc.mmap(None, pages * page, mmap.PROT_READ, flags, -1, 0)
  assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
  for i in range((map_limit() - leave - memory_maps()) // 2):
    page_i = base + (2 * i + 1) * page
    assert libc.mprotect(page_i, page, no_access) == 0, ctypes.get_errno()
