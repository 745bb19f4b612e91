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
  known: dict[int, int],
  *,
  max_compiles: int = 4,
) -> int | None:
  """The largest global train batch whose program fits the chip's HBM,
  by compiling. Memory per chip is close to linear in the batch: two
  compiled sizes give the estimate, which is then compiled and stepped
  down (by the data axis) until it fits. `known`: batch -> total bytes
  already compiled. None if the compile budget ran out first."""
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  slots = mesh.shape[sharding.DATA_AXIS]
  compiles = 0

  def total(batch):
    nonlocal compiles
    if batch not in known:
      compiles += 1
      try:
        c = compile_programs(
          config, devices, num_classes, train_batch=batch, with_eval=False
        )
        known[batch] = memory(c['train'])['total_bytes']
      except DoesNotFit as e:
        known[batch] = e.need_bytes
    return known[batch]

  b0 = min(known)
  # Two sizes for the slope: double a batch that fits, halve one that
  # does not (down to one image per data-axis slot).
  b1 = (
    b0 * 2
    if known[b0] <= chip.hbm_bytes
    else max(slots, b0 // 2 // slots * slots)
  )
  if b1 == b0 or not math.isfinite(total(b1)) or not math.isfinite(total(b0)):
    fits = [b for b, t in known.items() if t <= chip.hbm_bytes]
    return max(fits) if fits else None
  per_image = (total(b1) - total(b0)) / (b1 - b0)
  if per_image <= 0:
    return None
  fixed = total(b0) - per_image * b0
  guess = int((chip.hbm_bytes - fixed) / per_image) // slots * slots
  while guess >= slots and compiles < max_compiles:
    if total(guess) <= chip.hbm_bytes:
      return guess
    guess -= slots * max(1, guess // (8 * slots))
  fits = [b for b, t in known.items() if t <= chip.hbm_bytes]
  return max(fits) if fits else None
