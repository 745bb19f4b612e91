"""Saving arrays replicated over this process's 8 devices compiles no
program per array (Orbax's replica-parallel slicing is for jobs of several
processes: deeplab_jax/checkpointing/array_writes.py)."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deeplab_jax import checkpointing, models


def test_saving_a_replicated_model_compiles_nothing_per_array(tmp_path):
  model = models.create(
    'deeplabv3plus_resnet_tiny', num_classes=3, rngs=nnx.Rngs(0)
  )
  graphdef, state = nnx.split(model)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  model = nnx.merge(graphdef, state)
  weights = lambda m: jax.tree.leaves(nnx.state(m, (nnx.Param, nnx.BatchStat)))
  shapes = {leaf.shape for leaf in weights(model)}
  assert len(jax.devices()) == 8 and len(shapes) > 20

  compiled = []
  listener = lambda event, *_, **__: (
    event == '/jax/core/compile/backend_compile_duration'
    and compiled.append(event)
  )
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    checkpointing.save_model(
      tmp_path / 'ckpt', model, checkpointing.model_metadata(model)
    )
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # One slice program per array shape when each of the 8 replicas writes
  # a part of every array.
  assert len(compiled) == 0, len(compiled)
  loaded, _ = checkpointing.load_model(tmp_path / 'ckpt')
  for a, b in zip(weights(loaded), weights(model), strict=True):
    np.testing.assert_array_equal(a, b)
