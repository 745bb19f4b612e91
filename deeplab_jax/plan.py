"""An ahead-of-time plan of a recipe on a TPU slice, from any host.

`plan(config, 'v5e:2x4')` compiles the programs `train.train_and_evaluate`
runs (the same `programs.build_programs`: jit, shardings, donation, remat,
dtype and the kernels of the target platform) for a TPU topology through
libtpu's compile-only client: nothing runs and no TPU is needed. From the
compiled programs it reads what XLA reports: per-chip memory against the
chip's HBM, the FLOPs and bytes of a step (`cost_analysis`), a roofline
step time from the chip's data sheet, and the collectives of a step. The
largest global batch that fits is found by compiling. XLA's bytes count
every memory level; `hlo_traffic` splits the step's instruction-level
reads and writes into HBM and on-chip memory, for a second roofline on
HBM traffic alone and a breakdown of where the bytes go.

Data sheet figures (per chip, bf16 peak, HBM capacity and bandwidth) are
Google Cloud's: cloud.google.com/tpu/docs/v5e, /v5p and /v6e.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from deeplab_jax import hlo_traffic, models, sharding
from deeplab_jax.errors import ConfigError, UserError
from deeplab_jax.programs import Programs, programs_of


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's data sheet, per chip."""

  name: str
  hbm_bytes: float
  peak_flops: float  # bf16
  hbm_bytes_per_s: float
  source: str


_SHEETS = 'cloud.google.com/tpu/docs/'
# Keyed by the `device_kind` libtpu reports for the generation.
CHIPS = {
  'TPU v5 lite': Chip(
    'v5e', 16e9, 197e12, 819e9, 'cloud.google.com/tpu/docs/v5e'
  ),
  'TPU v5': Chip('v5p', 95e9, 459e12, 2765e9, 'cloud.google.com/tpu/docs/v5p'),
  'TPU v6 lite': Chip(
    'v6e', 32e9, 918e12, 1638e9, 'cloud.google.com/tpu/docs/v6e'
  ),
}
EXAMPLE_TOPOLOGIES = ('v5e:2x2', 'v5e:2x4', 'v5p:2x2x1', 'v5p:2x2x2', 'v6e:2x4')
COLLECTIVES = hlo_traffic.COLLECTIVES


def topology_devices(topology: str) -> tuple[list[Any], Chip]:
  """The TPU device descriptions of `topology` (e.g. `'v5e:2x4'`) and its
  chip's data sheet; one-line errors for a missing libtpu or an unknown
  topology."""
  if importlib.util.find_spec('libtpu') is None:
    raise UserError(
      'planning for a TPU needs libtpu (compile-only, no TPU needed): '
      f'pip install "jax[tpu]=={jax.__version__}", or pip install -e ".[tpu]"'
    )
  # Compile-only: no TPU is opened, so several planning processes (a
  # test suite's workers) may load libtpu at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies

  try:
    devices = topologies.get_topology_desc(topology, 'tpu').devices
  except Exception as e:  # libtpu's own error types
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(
      f'unknown TPU topology {topology!r} ({reason}); use GENERATION:SHAPE '
      f'with a generation of {", ".join(c.name for c in CHIPS.values())}, '
      f'e.g. {", ".join(EXAMPLE_TOPOLOGIES)}'
    ) from None
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise UserError(
      f'{topology}: no data sheet figures for {kind!r}; known: '
      f'{", ".join(c.name for c in CHIPS.values())}'
    )
  return list(devices), CHIPS[kind]


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


def collective_shapes(hlo_text: str, kind: str) -> list[str]:
  """The result shapes (HLO text, e.g. `f32[2,8,8,256]{3,2,1,0}`) of every
  `kind` collective in optimised HLO; an asynchronous pair counts once."""
  text = re.sub(r'/\*.*?\*/', '', hlo_text)  # tuple index comments
  pattern = re.compile(rf'=\s*(\(?[^=]*?\)?)\s+{kind}(?:-start)?\(')
  return pattern.findall(text)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """`{kind: {'count', 'bytes'}}` of the collectives in optimised HLO,
  bytes of each result shape."""
  out = {}
  for kind in COLLECTIVES:
    shapes = collective_shapes(hlo_text, kind)
    if shapes:
      out[kind] = {
        'count': len(shapes),
        'bytes': int(sum(sum(hlo_traffic.array_bytes(s)) for s in shapes)),
      }
  return out


def convolutions(hlo_text: str) -> int:
  """How many convolution instructions an optimised HLO program holds."""
  return len(re.findall(r'\sconvolution\(', hlo_text))


def traffic_breakdown(hlo_text: str, top: int = 12) -> dict[str, Any]:
  """Where a compiled step's bytes go (`hlo_traffic`): totals, bytes by
  kind and direction, and the `top` sources of the model code.
  `looped`: instructions inside loops (scans), which XLA's cost analysis
  counts once and this breakdown once per iteration."""
  ops = hlo_traffic.traffic(hlo_text)
  return {
    'looped': sum(o.repeats > 1 for o in ops),
    'hbm_bytes': sum(o.hbm_bytes for o in ops),
    'on_chip_bytes': sum(o.on_chip_bytes for o in ops),
    'flops': sum(o.flops for o in ops),
    'by_kind': hlo_traffic.summarise(ops, ('kind', 'direction')),
    'by_source': hlo_traffic.summarise(ops, ('source',))[:top],
  }


def traffic_table(row: dict[str, Any]) -> str:
  """A row's traffic breakdown as Markdown: kinds, then model sources (GB
  read and written per chip per step, HBM and on-chip)."""
  t = row.get('traffic')
  if not t:
    return ''
  lines = [
    f'{row["arch"]} on {row["topology"]}, batch {row["batch"]}: '
    f'{t["hbm_bytes"] / 1e9:.2f} GB HBM + {t["on_chip_bytes"] / 1e9:.2f} '
    'GB on chip, read and written by the instructions of one step, '
    f'{t["flops"] / 1e9:.1f} GFLOP in convolutions and dots (per chip)',
    '',
    '| kind | direction | instructions | HBM GB | on-chip GB | GFLOP |',
    '|---|---|---|---|---|---|',
  ]
  lines += [
    f'| {r["kind"]} | {r["direction"]} | {r["count"]} | '
    f'{r["hbm_bytes"] / 1e9:.2f} | {r["on_chip_bytes"] / 1e9:.2f} | '
    f'{r["flops"] / 1e9:.1f} |'
    for r in t['by_kind']
  ]
  lines += [
    '',
    '| source | instructions | HBM GB | on-chip GB | GFLOP |',
    '|---|---|---|---|---|',
  ]
  lines += [
    f'| {r["source"]} | {r["count"]} | {r["hbm_bytes"] / 1e9:.2f} | '
    f'{r["on_chip_bytes"] / 1e9:.2f} | {r["flops"] / 1e9:.1f} |'
    for r in t['by_source']
  ]
  return '\n'.join(lines)


def _hbm_roofline(row: dict[str, Any], chip: Chip) -> dict[str, float]:
  """The roofline on HBM traffic alone: the bytes the step's instructions
  read and write in HBM (`traffic_breakdown`), leaving out what XLA's
  memory-space assignment keeps in on-chip memory, against the step's
  convolution and dot FLOPs (a scan's body counted per iteration, which
  XLA's cost analysis counts once)."""
  t = row['traffic']
  compute_ms = 1e3 * t['flops'] / chip.peak_flops
  hbm_ms = 1e3 * t['hbm_bytes'] / chip.hbm_bytes_per_s
  step_ms = max(compute_ms, hbm_ms)
  return {
    'model_compute_ms': compute_ms,
    'hbm_traffic_ms': hbm_ms,
    'hbm_step_ms': step_ms,
    'hbm_mfu': compute_ms / step_ms if step_ms else 0.0,
  }


def _roofline(compiled, chip: Chip) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0))
  moved = float(cost.get('bytes accessed', 0.0))
  compute_s, memory_s = flops / chip.peak_flops, moved / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return {
    'flops': flops,
    'bytes_accessed': moved,
    'compute_ms': 1e3 * compute_s,
    'memory_ms': 1e3 * memory_s,
    'step_ms': 1e3 * step_s,
    'mfu': compute_s / step_s if step_s else 0.0,
  }


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


def plan(
  config: ml_collections.ConfigDict,
  topology: str,
  num_classes: int,
  *,
  find_largest: bool = True,
  max_compiles: int = 4,
  hlo_dir: str | None = None,
) -> dict[str, Any]:
  """A plan of `config` on `topology` as one JSON-able row (see the module
  docstring). `hlo_dir`: also write the compiled train step's optimised
  HLO text there, for `hlo_traffic` or a reader."""
  devices, chip = topology_devices(topology)
  try:
    compiled = compile_programs(config, devices, num_classes)
  except DoesNotFit as e:
    row = _refused_row(config, topology, chip, devices, e)
    return _with_largest_batch(
      row,
      config,
      devices,
      num_classes,
      chip,
      e.need_bytes,
      find_largest,
      max_compiles,
    )
  train_c, eval_c = compiled['train'], compiled['eval']
  mem = memory(train_c)
  text = train_c.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    scanned = '_scan_blocks' if config.model.get('scan_blocks') else ''
    name = (
      f'{config.model.arch}_c{num_classes}_{topology.replace(":", "_")}_b'
      f'{config.train.batch_size}_{config.model.dtype}{scanned}_train.hlo.txt'
    )
    with open(os.path.join(hlo_dir, name), 'w') as f:
      f.write(text)
  row = {
    **_describe(config, topology, chip, compiled['mesh']),
    'compile_s': round(compiled['compile_s'], 1),
    'train_compile_s': round(compiled['train_compile_s'], 1),
    **mem,
    'hbm_bytes': chip.hbm_bytes,
    'fits': mem['total_bytes'] <= chip.hbm_bytes,
    'margin_bytes': chip.hbm_bytes - mem['total_bytes'],
    **_roofline(train_c, chip),
    'collectives': collectives(text),
    'convolutions': convolutions(text),
    'traffic': traffic_breakdown(text),
    'eval_total_bytes': memory(eval_c)['total_bytes'] if eval_c else None,
    'data_sheet': chip.source,
  }
  row.update(_hbm_roofline(row, chip))
  row['eval_fits'] = (
    row['eval_total_bytes'] <= chip.hbm_bytes if eval_c else None
  )
  return _with_largest_batch(
    row,
    config,
    devices,
    num_classes,
    chip,
    mem['total_bytes'],
    find_largest,
    max_compiles,
  )


def _with_largest_batch(
  row,
  config,
  devices,
  num_classes,
  chip,
  total_bytes,
  find_largest,
  max_compiles,
) -> dict[str, Any]:
  """`row` with `largest_batch` found by compiling (if asked), from the
  recipe's batch and its `total_bytes` (or what the compiler said it needs)."""
  if find_largest:
    row['largest_batch'] = largest_batch(
      config,
      devices,
      num_classes,
      chip,
      {config.train.batch_size: total_bytes},
      max_compiles=max_compiles,
    )
  return row


def _describe(config, topology: str, chip: Chip, mesh) -> dict[str, Any]:
  """What a row is of: the run and the slice."""
  return {
    'arch': config.model.arch,
    'dataset': config.data.dataset,
    'topology': topology,
    'chip': chip.name,
    'chips': mesh.size,
    'mesh': dict(mesh.shape),
    'batch': config.train.batch_size,
    'crop': list(config.data.crop_size),
    'dtype': config.model.dtype,
    'remat': config.model.get('remat', 'none'),
    'scan_blocks': bool(config.model.get('scan_blocks', False)),
  }


def _refused_row(config, topology, chip, devices, refusal) -> dict[str, Any]:
  """The row of a program the TPU compiler refused for its memory: it does
  not fit; what it needs is the compiler's figure."""
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  row = {
    **_describe(config, topology, chip, mesh),
    'fits': False,
    'hbm_bytes': chip.hbm_bytes,
    'need_bytes': refusal.need_bytes,
    'refused': str(refusal),
    'data_sheet': chip.source,
  }
  return row


def table(rows: list[dict[str, Any]]) -> str:
  """The rows as a Markdown table (memory in GiB per chip)."""
  gib = lambda b: f'{b / 2**30:.2f}' if b is not None else '-'
  head = (
    '| arch | topology | batch | args | temp | out | total | HBM | fits '
    '(margin) | eval total | largest batch | GFLOP/chip | GB moved/chip | '
    'roofline ms | MFU ceiling | HBM GB/chip | HBM roofline ms | HBM MFU '
    'ceiling | collectives | compile s (train) |'
  )
  lines = [head, '|' + '---|' * 20]
  looped = False
  for r in rows:
    if 'refused' in r:  # the compiler refused it: what it needs, no costs
      lines.append(
        f'| {r["arch"]} | {r["topology"]} | {r["batch"]} | - | - | - | '
        f'> {gib(r["need_bytes"])} | {gib(r["hbm_bytes"])} | NO (the TPU '
        f'compiler refused it) | - | {r.get("largest_batch", "-")} | - | - '
        '| - | - | - | - | - | - | - |'
      )
      continue
    coll = ', '.join(
      f'{k} {v["count"]} ({v["bytes"] / 2**20:.1f} MiB)'
      for k, v in r['collectives'].items()
    )
    fits = f'{"yes" if r["fits"] else "NO"} ({gib(r["margin_bytes"])})'
    mark = '*' if r['traffic'].get('looped') else ''
    looped = looped or bool(mark)
    lines.append(
      f'| {r["arch"]} | {r["topology"]} | {r["batch"]} | '
      f'{gib(r["argument_bytes"])} | {gib(r["temp_bytes"])} | '
      f'{gib(r["output_bytes"])} | {gib(r["total_bytes"])} | '
      f'{gib(r["hbm_bytes"])} | {fits} | {gib(r["eval_total_bytes"])} | '
      f'{r.get("largest_batch", "-")} | {r["flops"] / 1e9:.1f}{mark} | '
      f'{r["bytes_accessed"] / 1e9:.2f}{mark} | {r["step_ms"]:.2f}{mark} | '
      f'{100 * r["mfu"]:.1f}%{mark} | {r["traffic"]["hbm_bytes"] / 1e9:.2f} | '
      f'{r["hbm_step_ms"]:.2f} | {100 * r["hbm_mfu"]:.1f}% | '
      f'{coll or "none"} | {r["compile_s"]} ({r["train_compile_s"]}) |'
    )
  if looped:
    lines += [
      '',
      "* XLA's cost analysis counts each loop's body once (the program "
      'scans); the HBM columns count every iteration.',
    ]
  return '\n'.join(lines)
