"""`StepOptions`: everything static that shapes the compiled train step.

Read from the config once (`StepOptions.from_config`), so the config keys
that change the program are listed here and nowhere else: `CONFIG_KEYS`
names each field's source, and `COMPUTE_ONLY` the keys that change how the
step is computed but not what it computes (a run resumes with those
changed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import optax

from deeplab_jax import optim
from deeplab_jax.errors import ConfigError
from deeplab_jax.models.conv_lowering import LOWERINGS

# Each field's config key (the optimizer and its schedule come from the
# whole `optim` group and the run's length).
CONFIG_KEYS = {
  'tx': ('optim', 'train.num_steps'),
  'schedule': ('optim', 'train.num_steps'),
  'seed': ('seed',),
  'mean': ('data.mean',),
  'std': ('data.std',),
  'class_weights': ('loss.class_weights',),
  'ohem_thresh': ('loss.ohem_thresh',),
  'ohem_min_kept': ('loss.ohem_min_kept',),
  'aux_weight': ('loss.aux_weight',),
  'ema_decay': ('optim.ema_decay',),
  'grad_accum_steps': ('optim.grad_accum_steps',),
  'freeze_bn': ('model.freeze_bn',),
  'remat': ('model.remat',),
  'scan_blocks': ('model.scan_blocks',),
  'conv_lowering': ('model.conv_lowering',),
}
# Fields that change memory and speed, never what is computed (remat and
# scan_blocks tested: the same step with and without them; a convolution
# lowering computes the same function, rounding differently). A finished
# run asked again with any of them changed resumes (train_test.py).
COMPUTE_ONLY_FIELDS = ('remat', 'scan_blocks', 'conv_lowering')
COMPUTE_ONLY = tuple(k for f in COMPUTE_ONLY_FIELDS for k in CONFIG_KEYS[f])
REMAT = ('none', 'full', 'blocks')


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The train step's static inputs (see `CONFIG_KEYS` for their keys).

  `graph` is the model's static half (`steps.split_model`); `remat` is
  `'none'`, `'full'` (the whole forward recomputed in backward) or
  `'blocks'` (each backbone block).
  """

  graph: Any
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  seed: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_weights: tuple[float, ...] | None
  ohem_thresh: float | None
  ohem_min_kept: int
  aux_weight: float
  ema_decay: float
  grad_accum_steps: int
  freeze_bn: bool
  remat: str
  scan_blocks: bool
  conv_lowering: str = 'auto'

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, graph: Any = None
  ) -> StepOptions:
    """The options of `config`; `graph` may follow with `dataclasses.replace`
    once the model is split (the training view needs `remat` first)."""
    tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
    weights = config.loss.class_weights
    return cls(
      graph=graph,
      tx=tx,
      schedule=schedule,
      seed=int(config.seed),
      mean=tuple(config.data.mean),
      std=tuple(config.data.std),
      class_weights=None if weights is None else tuple(weights),
      ohem_thresh=config.loss.ohem_thresh or None,
      ohem_min_kept=int(config.loss.ohem_min_kept),
      aux_weight=float(config.loss.aux_weight or 0.0),
      ema_decay=float(config.optim.ema_decay or 0.0),
      grad_accum_steps=int(config.optim.grad_accum_steps),
      freeze_bn=bool(config.model.freeze_bn),
      remat=remat_mode(config.model.remat),
      scan_blocks=bool(config.model.scan_blocks),
      conv_lowering=conv_lowering_mode(config.model.get('conv_lowering')),
    )


def conv_lowering_mode(value: Any) -> str:
  """`model.conv_lowering` (None: `'auto'`), checked to be one of
  `models.conv_lowering.LOWERINGS`."""
  value = 'auto' if value is None else value
  if value not in LOWERINGS:
    raise ConfigError(
      f'model.conv_lowering must be one of {", ".join(LOWERINGS)}, not '
      f'{value!r}'
    )
  return value


def remat_mode(value: Any) -> str:
  """`model.remat`, checked to be one of `REMAT`."""
  if not isinstance(value, str) or value not in REMAT:
    raise ConfigError(
      f'model.remat must be one of {", ".join(REMAT)}, not {value!r}'
    )
  return value
