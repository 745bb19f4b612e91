"""A recipe's programs compiled ahead of time for a TPU topology, and whether
they fit: per-chip memory, the compiler's out-of-memory refusal read as a
figure, and the largest global batch that fits, found by compiling."""

from __future__ import annotations

import copy
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from deeplab_jax import models, sharding
from deeplab_jax.errors import ConfigError
from deeplab_jax.planning.chips import Chip
from deeplab_jax.programs import Programs, programs_of


def abstract_model(config: ml_collections.ConfigDict, num_classes: int):
  """`config.model.arch` as shapes only (no weights are drawn)."""
  options = dict(config.model.options.to_dict())
  options.setdefault('dtype', config.model.dtype)
  return nnx.eval_shape(
    lambda: models.create(
      config.model.arch,
      num_classes=num_classes,
      rngs=nnx.Rngs(config.seed),
      **options,
    )
  )


def _with_batch(config, batch: int) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  with config.unlocked():
    config.train.batch_size = batch
  return config


def programs_for(
  config: ml_collections.ConfigDict,
  devices: list[Any],
  num_classes: int,
  *,
  train_batch: int | None = None,
  view: dict[str, Any] | None = None,
) -> tuple[Programs, dict[str, Any], dict[str, Any]]:
  """`(programs, train batch, eval batch)`: the run's programs over
  `devices` (`programs.build_programs`, as `train_and_evaluate` builds them)
  and the shapes of their batches, ready to `.lower(...)`. `view`: extra
  `nnx.view` settings on top of the training view (a lever to measure,
  e.g. `{'conv_lowering': 'native'}`)."""
  batch = train_batch or config.train.batch_size
  config = _with_batch(config, batch)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  slots = mesh.shape[sharding.DATA_AXIS]
  if batch % slots:
    raise ConfigError(
      f'train.batch_size={batch} does not split over the {slots} devices of '
      f'the data axis (mesh {dict(mesh.shape)}); use a multiple of {slots}'
    )
  model = abstract_model(config, num_classes)
  sharding.check_crop(config.data.crop_size, mesh, model.config.output_stride)
  programs, _, _ = programs_of(config, model, num_classes, mesh, view=view)
  h, w = config.data.crop_size
  train_in = {
    'image': _spec((batch, h, w, 3), jnp.uint8, programs.data),
    'label': _spec((batch, h, w), jnp.uint8, programs.data),
  }
  eb = -(-config.eval.batch_size // slots) * slots
  eh, ew = config.data.eval_pad_to or config.data.crop_size
  eval_in = {
    'image': _spec((eb, eh, ew, 3), jnp.float32, programs.data),
    'label': _spec((eb, eh, ew), jnp.int32, programs.data),
    'mask': _spec((eb, eh, ew), jnp.bool_, programs.data),
  }
  return programs, train_in, eval_in


class DoesNotFit(Exception):
  """The TPU compiler refused a program: its memory exceeds the chip's HBM.
  `need_bytes`: what the compiler said the program needs (its
  temporaries, or the total it names)."""

  def __init__(self, need_bytes: float, message: str):
    super().__init__(message)
    self.need_bytes = need_bytes


_OUT_OF_MEMORY = re.compile(
  r'Ran out of memory in memory space hbm|Ran out of memory on HBM'
  r'|RESOURCE_EXHAUSTED'
)


_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def _compile(lowered):
  """`lowered.compile()`, with the TPU compiler's out-of-memory refusal as
  `DoesNotFit` (the bytes it says the program needs)."""
  try:
    return lowered.compile()
  except Exception as e:  # noqa: BLE001 - JaxRuntimeError and its kin
    text = str(e)
    if not _OUT_OF_MEMORY.search(text):
      raise
    need = re.search(r'\(([\d.]+)([KMGT]?)\) exceeds', text)
    first = text.strip().splitlines()[0][:300]
    if not need:
      raise DoesNotFit(float('inf'), first) from e
    raise DoesNotFit(float(need[1]) * _UNITS[need[2]], first) from e


def compile_programs(
  config: ml_collections.ConfigDict,
  devices: list[Any],
  num_classes: int,
  *,
  train_batch: int | None = None,
  with_eval: bool = True,
) -> dict[str, Any]:
  """The compiled train (and eval) programs of `config` over `devices`.

  Returns `{'train': Compiled, 'eval': Compiled or None, 'mesh': Mesh,
  'compile_s': seconds of both, 'train_compile_s': seconds of train}`.
  """
  programs, train_in, eval_in = programs_for(
    config, devices, num_classes, train_batch=train_batch
  )
  start = time.perf_counter()
  compiled = {'train': _compile(programs.train.lower(programs.state, train_in))}
  compiled['train_compile_s'] = time.perf_counter() - start
  compiled['eval'] = None
  if with_eval:
    state = programs.state
    compiled['eval'] = _compile(
      programs.eval.lower(state.eval_params, state.batch_stats, eval_in)
    )
  compiled['compile_s'] = time.perf_counter() - start
  compiled['mesh'] = programs.data.mesh
  return compiled


def _spec(shape, dtype, sharding_):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def memory(compiled) -> dict[str, int]:
  """Per-chip bytes of a compiled program: arguments, temporaries, outputs
  (less those aliased to donated arguments) and their total."""
  m = compiled.memory_analysis()
  out = {
    'argument_bytes': int(m.argument_size_in_bytes),
    'temp_bytes': int(m.temp_size_in_bytes),
    'output_bytes': int(m.output_size_in_bytes - m.alias_size_in_bytes),
    'code_bytes': int(m.generated_code_size_in_bytes),
  }
  out['total_bytes'] = sum(out.values())
  return out


def largest_batch(
  config: ml_collections.ConfigDict,
  devices: list[Any],
  num_classes: int,
  chip: Chip,
  known: dict[int, float],
  *,
  max_compiles: int = 4,
) -> tuple[int | None, bool]:
  """The largest global train batch whose program fits the chip's HBM, by
  compiling, and whether that is settled: the batch one image per data-axis
  slot larger was compiled and does not fit (or, for None, one image per
  slot does not fit). Unsettled when `max_compiles` ran out first; the
  batch is then the largest compiled that fits.

  Memory per chip grows with the batch, but not in proportion (docs/tpu.md,
  the plan's columns: "largest batch"): each next batch is where the line
  through the two compiled sizes nearest the limit reaches it, strictly
  between the largest batch that fits and the smallest that does not.
  `known`: batch -> total bytes already compiled (the refused need)."""
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  slots = mesh.shape[sharding.DATA_AXIS]
  limit = chip.hbm_bytes
  compiles = 0
  while True:
    lo = max((b for b, t in known.items() if t <= limit), default=None)
    hi = min(
      (b for b, t in known.items() if t > limit and (lo is None or b > lo)),
      default=None,
    )
    if hi is not None and hi - (lo or 0) <= slots:
      return lo, True
    if compiles == max_compiles:
      return lo, False
    batch = _next_batch(known, lo, hi, slots, limit)
    try:
      c = compile_programs(
        config, devices, num_classes, train_batch=batch, with_eval=False
      )
      known[batch] = memory(c['train'])['total_bytes']
    except DoesNotFit as e:
      known[batch] = e.need_bytes
    compiles += 1


def _next_batch(known, lo, hi, slots, limit) -> int:
  """Where the line through the two compiled batches nearest the limit
  reaches it (whole images per slot), strictly inside (lo, hi); doubling
  or halving where no line is known."""
  near = sorted(
    (b for b, t in known.items() if math.isfinite(t)),
    key=lambda b: (b not in (lo, hi), abs(known[b] - limit)),
  )[:2]
  guess = None
  if len(near) == 2:
    (b1, b2), (t1, t2) = near, (known[near[0]], known[near[1]])
    if b1 != b2 and (t2 - t1) / (b2 - b1) > 0:
      guess = b1 + (limit - t1) * (b2 - b1) / (t2 - t1)
  if guess is None:
    guess = 2 * lo if lo is not None else hi / 2
  guess = int(guess) // slots * slots
  if lo is not None:
    guess = max(guess, lo + slots)
  if hi is not None:
    guess = min(guess, hi - slots)
  return max(guess, slots)
