"""The programs of a run: the training view of a model and the builder that
jits the init, train and eval steps with their shardings over a mesh.

Training (`train.train_and_evaluate`), the planner (`planning`) and the
benchmark (`benchmarking`) all build their programs here, so what is
planned and measured is what trains.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
from flax import nnx

from deeplab_jax import models, sharding
from deeplab_jax.step_options import StepOptions
from deeplab_jax.steps import eval_step, initial_state, split_model, train_step


def training_view(
  model: nnx.Module, options: StepOptions, mesh: jax.sharding.Mesh
) -> nnx.Module:
  """The model as `mesh`'s devices train it: kernels for their platform
  (or `model.conv_lowering`'s), frozen BatchNorm, per-block remat and
  scanned blocks, as `options` ask;
  XLA's own convolutions on a spatial mesh, whose halo exchange XLA
  partitions (the patch, tap and Winograd lowerings reshape the height into
  tiles or slices, which made XLA gather whole activations)."""
  model = models.platform_view(model, models.platform_of(mesh))
  if sharding.spatial_size(mesh) > 1:
    model = nnx.view(model, conv_lowering='native')
  elif options.conv_lowering != 'auto':
    model = nnx.view(model, conv_lowering=options.conv_lowering)
  if options.freeze_bn:
    model = nnx.view(model, use_running_average=True)
  if options.remat == 'blocks':
    model = nnx.view(model, remat_blocks=True)
  if options.scan_blocks:
    model = nnx.view(model, scan_blocks=True)
  return model


class Programs(NamedTuple):
  """The jitted programs of a run, with the shardings they were built for:
  what `train_and_evaluate` runs and `plan` compiles ahead of time."""

  init: Callable[..., Any]  # (params, stats) -> state, created sharded
  train: Callable[..., Any]  # (state, batch) -> (state, logs); donates state
  eval: Callable[..., Any]  # (weights, batch_stats, batch) -> confusion
  state: Any  # the state's shapes, each with its sharding
  data: jax.sharding.NamedSharding  # of every batch array


def build_programs(
  options: StepOptions,
  params: Any,
  stats: Any,
  num_classes: int,
  mesh: jax.sharding.Mesh,
  param_sharding: str = 'replicated',
) -> Programs:
  """The run's programs over `mesh`: the state replicated, or split with
  `param_sharding='fsdp'` (`mesh.param_sharding`), the batch as
  `sharding.data_sharding`, the state donated into the train step.
  `params` and `stats` may be concrete or `jax.ShapeDtypeStruct`s (a plan
  for devices that are not attached). Training, `scripts.plan` and
  `scripts.benchmark` all build their programs here."""
  init = functools.partial(initial_state, options=options)
  shapes = jax.eval_shape(init, params, stats)
  shardings = sharding.state_shardings(shapes, mesh, param_sharding)
  data = sharding.data_sharding(mesh)
  train_fn = jax.jit(
    functools.partial(train_step, options=options),
    in_shardings=(shardings, data),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    functools.partial(
      eval_step, graph=options.graph, num_classes=num_classes, mesh=mesh
    ),
    in_shardings=(shardings.eval_params, shardings.batch_stats, data),
    out_shardings=sharding.replicated(mesh),
  )
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    shardings,
  )
  return Programs(
    init=jax.jit(init, out_shardings=shardings),
    train=train_fn,
    eval=eval_fn,
    state=abstract,
    data=data,
  )


def programs_of(
  config: ml_collections.ConfigDict,
  model: nnx.Module,
  num_classes: int,
  mesh: jax.sharding.Mesh,
  *,
  view: dict[str, Any] | None = None,
) -> tuple[Programs, Any, Any]:
  """`(programs, params, batch_stats)` of `config` for `model` over `mesh`:
  the training view, `StepOptions` and `build_programs`, as
  `train_and_evaluate` runs them. `model` may be abstract (`nnx.eval_shape`:
  a plan). `view`: extra `nnx.view` settings on top of the training view
  (a lever to measure, e.g. `{'conv_lowering': 'native'}`)."""
  options = StepOptions.from_config(config)
  model = training_view(model, options, mesh)
  if view:
    model = nnx.view(model, **view)
  graph, params, stats = split_model(model)
  programs = build_programs(
    dataclasses.replace(options, graph=graph),
    params,
    stats,
    num_classes,
    mesh,
    config.mesh.param_sharding,
  )
  return programs, params, stats
