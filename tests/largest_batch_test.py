"""The largest-batch search's next size, from compiled sizes and their
per-chip bytes (hand-made here; tpu_test.py runs the search on compiled
TPU programs)."""

import math

from deeplab_jax.planning.compiling import _next_batch

LIMIT = 60.0
SLOTS = 4


def test_the_line_through_the_nearest_sizes_reaches_the_limit():
  # 0.75 bytes per image from 16: 24 more bytes are 32 more images.
  assert _next_batch({8: 30.0, 16: 36.0}, 16, None, SLOTS, LIMIT) == 48
  # Bracketed (16 fits, 48 does not): the line through those two, 34 bytes
  # over 32 images, reaches 60 at 38.6, whole images per slot: 36.
  known = {8: 30.0, 16: 36.0, 48: 70.0}
  assert _next_batch(known, 16, 48, SLOTS, LIMIT) == 36


def test_the_next_size_stays_strictly_inside_the_bracket():
  # The line says 20.4; 20 is the largest known to fit: one more per slot.
  assert _next_batch({16: 59.0, 20: 59.9}, 20, None, SLOTS, LIMIT) == 24
  # 32 was refused without a figure; the line through 8 and 16 says 48:
  # one fewer per slot than 32.
  known = {8: 30.0, 16: 36.0, 32: math.inf}
  assert _next_batch(known, 16, 32, SLOTS, LIMIT) == 28


def test_without_a_rising_line_it_doubles_or_halves():
  assert _next_batch({8: 30.0, 16: 30.0}, 16, None, SLOTS, LIMIT) == 32
  # A refusal without a figure, and nothing that fits: half, at least one
  # image per slot.
  assert _next_batch({16: math.inf}, None, 16, SLOTS, LIMIT) == 8
  assert _next_batch({8: math.inf}, None, 8, SLOTS, LIMIT) == 4
