"""An ahead-of-time plan of a recipe on a TPU slice, from any host.

`plan(config, 'v5e:2x4')` compiles the programs `train.train_and_evaluate`
runs (the same `programs.build_programs`: jit, shardings, donation, remat,
dtype and the kernels of the target platform) for a TPU topology through
libtpu's compile-only client: nothing runs and no TPU is needed. From the
compiled programs it reads what XLA reports: per-chip memory against the
chip's HBM, the FLOPs and bytes of a step (`cost_analysis`), a roofline
step time from the chip's data sheet, and the collectives of a step. The
largest global batch that fits is found by compiling. XLA's bytes count
every memory level; `traffic` splits the step's instruction-level
reads and writes into HBM and on-chip memory, for a second roofline on
HBM traffic alone and a breakdown of where the bytes go.

Data sheet figures (per chip, bf16 peak, HBM capacity and bandwidth) are
Google Cloud's: cloud.google.com/tpu/docs/v5e, /v5p and /v6e.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from deeplab_jax import sharding
from deeplab_jax.planning.chips import Chip, topology_devices
from deeplab_jax.planning.compiling import (
  DoesNotFit,
  compile_programs,
  largest_batch,
  memory,
)
from deeplab_jax.planning.traffic import (
  collectives,
  convolutions,
  traffic_breakdown,
)


def roofline(flops: float, moved: float, chip: Chip) -> dict[str, float]:
  """A step's roofline on `chip`: the time of its `flops` at the bf16 peak
  and of `moved` bytes at the HBM bandwidth, the step as the slower of the
  two, and the MFU ceiling that implies (an upper bound, never a
  measurement)."""
  compute_s, memory_s = flops / chip.peak_flops, moved / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return {
    'compute_ms': 1e3 * compute_s,
    'memory_ms': 1e3 * memory_s,
    'step_ms': 1e3 * step_s,
    'mfu': compute_s / step_s if step_s else 0.0,
  }


def _xla_roofline(compiled, chip: Chip) -> dict[str, float]:
  """The roofline on XLA's own cost analysis of the step: every byte it
  counts as accessed, at HBM bandwidth."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0))
  moved = float(cost.get('bytes accessed', 0.0))
  return {
    'flops': flops,
    'bytes_accessed': moved,
    **roofline(flops, moved, chip),
  }


def _hbm_roofline(traffic: dict[str, Any], chip: Chip) -> dict[str, float]:
  """The roofline on HBM traffic alone: the bytes the step's instructions
  read and write in HBM as the TPU lays them out (tiles padded;
  `traffic_breakdown`), leaving out what XLA's memory-space assignment
  keeps in on-chip memory, against the step's convolution and dot FLOPs
  (a scan's body counted per iteration, which XLA's cost analysis counts
  once)."""
  r = roofline(traffic['flops'], traffic['padded_hbm_bytes'], chip)
  return {
    'model_compute_ms': r['compute_ms'],
    'hbm_traffic_ms': r['memory_ms'],
    'hbm_step_ms': r['step_ms'],
    'hbm_mfu': r['mfu'],
  }


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
  HLO text there, for `traffic` or a reader."""
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
    **_xla_roofline(train_c, chip),
    'collectives': collectives(text),
    'convolutions': convolutions(text),
    'traffic': traffic_breakdown(
      text, peak_flops=chip.peak_flops, hbm_bytes_per_s=chip.hbm_bytes_per_s
    ),
    'eval_total_bytes': memory(eval_c)['total_bytes'] if eval_c else None,
    'data_sheet': chip.source,
  }
  row.update(_hbm_roofline(row['traffic'], chip))
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
    row['largest_batch'], row['largest_batch_settled'] = largest_batch(
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
