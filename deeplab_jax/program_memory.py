"""Room for the next compiled program in a process that compiles many.

XLA:CPU loads the machine code of every program it compiles into memory
maps of its own and keeps them while JAX caches the program: hundreds of
maps for one of these networks at one input size (docs/testing.md). The
kernel caps the maps a process may hold (`vm.max_map_count`); at the cap
the next compile cannot map its code and the process dies with SIGSEGV
instead of raising. Prediction and evaluation compile one program per
image size, so a folder or data set of many sizes would get there;
`make_room()` before each new size (`NewShapes`) drops JAX's cached
programs (they compile again when next needed) once half the cap is in use.
"""

import jax


def memory_maps() -> int | None:
  """How many memory maps this process holds (None where the system does
  not say: no `/proc`)."""
  try:
    with open('/proc/self/maps') as f:
      return sum(1 for _ in f)
  except OSError:
    return None


def map_limit() -> int | None:
  """The kernel's cap on memory maps per process, or None where unknown."""
  try:
    with open('/proc/sys/vm/max_map_count') as f:
      return int(f.read())
  except (OSError, ValueError):
    return None


def make_room() -> bool:
  """Drops every program JAX has cached (`jax.clear_caches()`) when this
  process holds more than half the memory maps it may; returns whether it
  did. Cheap to call before each compile for a new input shape."""
  used, limit = memory_maps(), map_limit()
  if used is None or limit is None or used <= limit // 2:
    return False
  jax.clear_caches()
  return True


class NewShapes:
  """Calls `make_room()` before the first batch of each input shape (the
  batches that compile), not before every batch: counting the maps reads
  `/proc/self/maps`, tens of thousands of lines in a process near the cap.
  """

  def __init__(self):
    self._seen: set[tuple[int, ...]] = set()

  def before(self, shape: tuple[int, ...]) -> None:
    """To call before running a batch of input `shape`."""
    if shape in self._seen:
      return
    if make_room():  # every shape seen so far compiles again
      self._seen.clear()
    self._seen.add(shape)
