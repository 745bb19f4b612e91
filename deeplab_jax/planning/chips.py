"""The TPU generations a plan can target, and the compile-only devices of a
topology.

Data sheets per chip (bf16 peak, HBM capacity and bandwidth) are Google
Cloud's: cloud.google.com/tpu/docs/v5e, /v5p and /v6e."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax

from deeplab_jax.errors import UserError


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
