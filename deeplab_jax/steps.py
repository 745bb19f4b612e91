"""The train state and the steps every program computes.

`split_model` and `initial_state` make a `TrainState` from a model;
`train_step` advances it by one batch; `eval_step` counts a batch's
confusion matrix. They are module-level functions that anyone can call; the
caller applies `jax.jit` and the shardings, as `programs.build_programs`
does for training, the planner and the benchmark.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from deeplab_jax import losses, metrics, optim
from deeplab_jax.data import normalization
from deeplab_jax.predict import inference_view
from deeplab_jax.step_options import StepOptions


class Graph(NamedTuple):
  """The static half of a model, which `nnx.merge` joins with the arrays."""

  train: Any  # graphdef of the training model
  eval: Any  # graphdef of its inference view
  rest: Any  # shapes of the non-weight state (dropout RNG streams)


def split_model(model: nnx.Module) -> tuple[Graph, dict, dict]:
  """`(graph, params, batch_stats)` of a model; the arrays as pure dicts."""
  graphdef, params, stats, rest = nnx.split(
    model, nnx.Param, nnx.BatchStat, ...
  )
  rest = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(rest)
  )
  eval_graphdef = nnx.split(
    inference_view(model), nnx.Param, nnx.BatchStat, ...
  )[0]
  graph = Graph(graphdef, eval_graphdef, rest)
  return graph, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


@struct.dataclass
class TrainState:
  """Everything the train step reads and writes, as one pytree: the step
  count, parameters, BatchNorm statistics, optimizer state, and `ema` (a
  moving average of the parameters, or None when none is kept)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any = None

  @property
  def eval_params(self) -> Any:
    """The parameters evaluation uses and checkpoints' `model` item holds:
    the EMA when one is kept."""
    return self.params if self.ema is None else self.ema


def initial_state(params: Any, stats: Any, options: StepOptions) -> TrainState:
  """The state at step 0: the optimizer initialised from `options.tx`, and
  an EMA starting at the parameters when `options.ema_decay` is set."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=stats,
    opt_state=options.tx.init(params),
    ema=jax.tree.map(jnp.copy, params) if options.ema_decay else None,
  )


def _step_rngs(rest_template: Any, key: jax.Array) -> Any:
  """Fresh dropout streams for one step: leaf i gets `fold_in(key, i)`."""
  leaves, treedef = jax.tree.flatten(rest_template)
  out = []
  for i, leaf in enumerate(leaves):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      out.append(jax.random.fold_in(key, i))
    else:
      out.append(jnp.zeros(leaf.shape, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def loss_of(
  out: dict[str, jax.Array], labels: jax.Array, options: StepOptions
) -> jax.Array:
  """Cross-entropy of the main logits, plus `options.aux_weight` times the
  auxiliary head's when the model has one."""
  ce = lambda logits: losses.cross_entropy(
    logits,
    labels,
    class_weights=options.class_weights,
    ohem_thresh=options.ohem_thresh,
    ohem_min_kept=options.ohem_min_kept,
  )
  total = ce(out['out'])
  if 'aux' in out and options.aux_weight:
    total = total + options.aux_weight * ce(out['aux'])
  return total


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  options: StepOptions,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer micro-step on `batch` (`image` uint8 pixels, normalised
  here with `options.mean` / `options.std`; `label` class ids, 255
  ignored).

  Returns the new state and `{'loss', 'lr', 'grad_norm'}`. `options`
  (`StepOptions.from_config`) supplies the model graph, optimizer, loss,
  EMA decay, gradient accumulation, remat and the dropout seed.
  """
  graph = options.graph
  rngs = _step_rngs(
    graph.rest, jax.random.fold_in(jax.random.key(options.seed), state.step)
  )

  def forward(params, stats, rngs, images):
    model = nnx.merge(graph.train, params, stats, rngs)
    out = model(images)
    _, _, new_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return out, nnx.to_pure_dict(new_stats)

  if options.remat == 'full':
    # Recompute the whole forward pass during backward: activation memory
    # of one layer at a time for about a third more compute. ('blocks'
    # rematerialises each backbone block instead, through the model view.)
    forward = jax.checkpoint(forward)

  images = normalization.normalize_on_device(
    batch['image'], options.mean, options.std
  )
  labels = batch['label'].astype(jnp.int32)

  def loss_fn(params):
    out, stats = forward(params, state.batch_stats, rngs, images)
    return loss_of(out, labels, options), stats

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = options.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if options.ema_decay:
    ema = optim.ema_update(state.ema, params, options.ema_decay)
    if options.grad_accum_steps > 1:
      # Only the micro-steps that update the parameters move the average.
      applied = (state.step + 1) % options.grad_accum_steps == 0
      ema = jax.tree.map(
        lambda e, old: jnp.where(applied, e, old), ema, state.ema
      )
  new = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=stats,
    opt_state=opt_state,
    ema=ema,
  )
  logs = {
    'loss': loss,
    'lr': options.schedule(state.step),
    'grad_norm': optax.tree.norm(grads),
  }
  return new, logs


def eval_step(
  params: dict,
  stats: dict,
  batch: dict[str, jax.Array],
  *,
  graph: Graph,
  num_classes: int,
  mesh: jax.sharding.Mesh,
) -> jax.Array:
  """The `[K, K]` confusion matrix of one batch (`image` normalised,
  `label`, `mask` of the real pixels) split over `mesh`'s data axis."""
  rngs = _step_rngs(graph.rest, jax.random.key(0))  # unused: no dropout
  model = nnx.merge(graph.eval, params, stats, rngs)
  pred = jnp.argmax(model(batch['image'])['out'], axis=-1)
  return metrics.sharded_confusion_matrix(
    pred, batch['label'], batch['mask'], num_classes, mesh
  )
