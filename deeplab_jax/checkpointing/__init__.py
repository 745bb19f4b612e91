"""The one place that talks to Orbax; it imports nothing that fetches
weights (published names are resolved by `convert.sources`, above it).

A checkpoint directory holds numbered steps (`DIR/<step>/`), each with the
items `model` (parameters and BatchNorm statistics as a nested dict), `meta`
(JSON: arch, model config, class names, normalisation) and `digests`;
training adds `train` (optimizer state, step, EMA) and `data` (the input's
position).

- `model_io`: `save_model`, `load_model`, `read_metadata`, `model_metadata`,
  `training_config`: inference checkpoints.
- `train_checkpointer`: `TrainCheckpointer`, the run's saves and restores.
- `layout`: how a train state maps onto the items.
- `digests`: content digests, written and verified.
- `paths`: directories and committed steps.
- `array_writes`: how Orbax writes the arrays (replica-parallel only
  across processes).
"""

from deeplab_jax.checkpointing.layout import data_position
from deeplab_jax.checkpointing.model_io import (
  load_model,
  model_metadata,
  read_metadata,
  save_model,
  training_config,
)
from deeplab_jax.checkpointing.paths import has_steps, resolve_path
from deeplab_jax.checkpointing.train_checkpointer import TrainCheckpointer

__all__ = [
  'TrainCheckpointer',
  'data_position',
  'has_steps',
  'load_model',
  'model_metadata',
  'read_metadata',
  'resolve_path',
  'save_model',
  'training_config',
]
