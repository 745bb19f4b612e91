"""`train_and_evaluate(config, workdir)`: the training library (no flags).

Data-parallel over a `('data',)` mesh: the batch is sharded, parameters,
optimizer state and BatchNorm statistics are replicated (or split with
`mesh.param_sharding='fsdp'`), and one `jax.jit` step (state donated)
computes the loss over the global batch, so BatchNorm statistics are
synchronised across devices and hosts for free.

The steps are module-level functions that anyone can call: `split_model`
and `initial_state` make a train state from a model, `train_step` advances
it by one batch, `eval_step` counts a batch's confusion matrix. The caller
applies `jax.jit` and the shardings, as `train_and_evaluate` does.

A workdir holds `config.json`, `metrics.jsonl`, TensorBoard events (`tb/`)
and checkpoints (`checkpoints/`). Starting with a workdir that has
checkpoints resumes from the latest one, data iterator included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx, struct
from jax.experimental import multihost_utils
from tqdm import tqdm

from deeplab_jax import (
  checkpointing,
  initialization,
  losses,
  metrics,
  models,
  multihost,
  optim,
  run_dir,
  sharding,
)
from deeplab_jax.convert import sources
from deeplab_jax.data import datasets, labels, normalization, pipeline
from deeplab_jax.errors import ConfigError, UserError
from deeplab_jax.predict import inference_view
from deeplab_jax.step_options import StepOptions, remat_mode


class TrainingDivergedError(UserError):
  """The loss became NaN or infinite."""


class Preempted(Exception):
  """SIGTERM / preemption, or Ctrl-C: a checkpoint was written."""

  def __init__(self, step: int, directory: str, *, interrupted: bool = False):
    what = 'interrupted' if interrupted else 'preempted'
    super().__init__(
      f'{what}: saved a checkpoint at step {step} in {directory}; run the '
      'same command to resume'
    )
    self.step = step
    self.interrupted = interrupted


# ------------------------------------------------------------ the steps ---


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


def evaluate_params(
  config: ml_collections.ConfigDict,
  eval_fn: Callable[..., jax.Array],
  params: dict,
  stats: dict,
  mesh: jax.sharding.Mesh,
  class_names: Any,
) -> dict[str, Any]:
  """mIoU etc. over the whole eval split, as training reports it.

  Unlike `scripts.evaluate`, which runs each image at its own size, images
  are zero-padded to `data.eval_pad_to` (or the batch's largest) and the
  padding is masked out of the counts: exact for fixed-size data sets
  (Cityscapes), an approximation on mixed sizes (padding reaches ASPP's
  image pooling). `eval_fn(params, stats, batch)` is the jitted `eval_step`.
  """
  num_classes = len(class_names)
  total = jnp.zeros((num_classes, num_classes), jnp.int32)
  batches = pipeline.eval_batches(
    config.data.dataset,
    config.data.eval_split,
    data_dir=config.data.data_dir,
    global_batch_size=config.eval.batch_size,
    mean=tuple(config.data.mean),
    std=tuple(config.data.std),
    pad_to=config.data.eval_pad_to,
    height_multiple=sharding.spatial_size(mesh),
  )
  progress = tqdm(
    batches,
    desc='eval',
    unit='batch',
    leave=False,
    dynamic_ncols=True,
    disable=jax.process_index() != 0,
  )
  for batch in progress:
    total = total + eval_fn(params, stats, sharding.to_global(batch, mesh))
  return metrics.summarize(np.asarray(jax.device_get(total)), class_names)


# -------------------------------------------------------------- the run ---


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it has checkpoints).

  A workdir has one writer: process 0 holds `run_dir.WriterLock` for the
  whole run, so a second training process on a live local workdir is
  refused at once, naming the live one.

  Returns:
    The last evaluation summary (`miou`, per-class IoU, ...) and the final
    step, as a dict.
  """
  workdir = checkpointing.resolve_path(workdir)
  # Process 0 owns the workdir: its lock and run record. What refuses a
  # start is decided before any collective and every process learns it.
  lock = None
  if jax.process_index() == 0 and not run_dir.is_remote(workdir):
    lock = run_dir.WriterLock(workdir, on_lost=multihost.stop_job)
  try:
    multihost.decide('workdir', lambda: _claim_workdir(config, workdir, lock))
    multihost.decide(
      'config and data', lambda: _check_start(config), every_process=True
    )
    return _train_and_evaluate(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _claim_workdir(config, workdir: str, lock) -> None:
  """Process 0: the workdir is a folder (or can be), ours to write, and
  holds no run of another config."""
  run_dir.check_path(workdir)
  if lock is None:
    logging.warning(
      '%s has no writer lock (remote storage): make sure that one job '
      'writes it at a time (docs/distributed.md)',
      workdir,
    )
    run_dir.check(config, workdir)
    return
  lock.acquire()
  try:
    run_dir.check(config, workdir)
  except BaseException:
    lock.release()
    raise


def _check_start(config) -> None:
  """Every check that can refuse the run, on each process, before a step or
  a download: the mesh and batch sizes, the config, the crop, and the data
  this process reads (both splits)."""
  mesh = sharding.make_mesh(config.mesh.shape)
  sharding.check_batch_size(config.train.batch_size, mesh)
  sharding.check_batch_size(config.eval.batch_size, mesh, 'eval.batch_size')
  spec = _label_spec(config)
  _check_config(config, spec.num_classes)
  options = dict(config.model.options.to_dict())
  arch = models.registry.make_config(config.model.arch, **options)
  sharding.check_crop(config.data.crop_size, mesh, arch.output_stride)
  for split in (config.data.train_split, config.data.eval_split):
    datasets.open_split(config.data.dataset, split, config.data.data_dir)


def _train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.shape)
  spec = _label_spec(config)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  resuming = checkpointing.has_steps(ckpt_dir)
  model = initialization.create_model(
    config, spec.num_classes, resuming=resuming
  )
  meta = checkpointing.model_metadata(
    model,
    class_names=spec.class_names,
    mean=config.data.mean,
    std=config.data.std,
    extra={
      'dataset': config.data.dataset,
      # Which parameters the `model` item holds (`TrainState.eval_params`).
      'weights': 'ema' if config.optim.ema_decay else 'params',
      'init_from': initialization.init_record(model),
    },
  )
  programs, params, stats = programs_of(config, model, spec.num_classes, mesh)
  del model
  state = programs.init(params, stats)
  del params, stats
  train_fn = multihost.CompiledOnFirstCall(
    programs.train, 'train step compiled'
  )
  eval_fn = multihost.CompiledOnFirstCall(programs.eval, 'eval step compiled')

  # Orbax's first collective follows: hosts meet after their unequal work
  # (process 0 checks the workdir, model init compiles).
  multihost.meet('checkpointer')
  ckpt = checkpointing.TrainCheckpointer(
    ckpt_dir,
    every_steps=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    allow_unverified=config.checkpoint.allow_unverified,
  )
  position = functools.partial(
    checkpointing.data_position,
    seed=config.seed,
    global_batch_size=config.train.batch_size,
  )
  restored = ckpt.restore(state, position(0))
  if restored is not None and is_main:
    print(
      f'resuming from step {int(jax.device_get(restored.step))} '
      f'({ckpt.restored_saved_at()}) in {ckpt.directory}',
      file=sys.stderr,
    )
  if resuming:
    if restored is None:  # the steps vanished since has_steps looked
      raise checkpointing.CheckpointNotFoundError(
        f'the checkpoints in {ckpt_dir} went away while the run started; '
        'run the same command again'
      )
    # The weights' origin, as the run's first checkpoint recorded it.
    meta['init_from'] = ckpt.restored_metadata.get('init_from')
  state = restored or state
  first_step = int(jax.device_get(state.step))
  train_ds, _ = pipeline.train_dataset(
    _input_config(config), start_step=first_step
  )
  train_iter = iter(train_ds)

  def evaluate_state(state):
    return evaluate_params(
      config,
      eval_fn,
      state.eval_params,
      state.batch_stats,
      mesh,
      spec.class_names,
    )

  def save(step, state, **kwargs):
    ckpt.save(step, state, position(step), meta, **kwargs)

  summary: dict[str, Any] = {}
  with contextlib.ExitStack() as cleanup:
    # Signal handlers first: from here on a signal is a flag, never an
    # exception that would leave the TensorBoard writer's thread running.
    stop = cleanup.enter_context(_stop_requests(is_main))
    if is_main:
      run_dir.claim(config, workdir)
    logger = cleanup.enter_context(run_dir.MetricsLog(workdir, is_main))
    bar = cleanup.enter_context(
      tqdm(
        total=config.train.num_steps,
        initial=first_step,
        disable=not is_main,
        desc='train',
        dynamic_ncols=True,
      )
    )
    cleanup.callback(ckpt.close)
    cleanup.callback(ckpt.wait_until_finished)
    rate = _Rate(first_step, config.train.batch_size)
    logged = False
    multihost.set_hang_timeout(config.train.hang_timeout_s)
    for step in range(first_step, config.train.num_steps):
      multihost.at_step(step)
      batch = sharding.to_global(next(train_iter), mesh)
      if step == first_step and is_main:
        bar.write(
          'compiling the train step (cached after the first run)',
          file=sys.stderr,
        )
      state, logs = train_fn(state, batch)
      if step == first_step:
        rate.restart(first_step)  # images/s without the compilation
        if is_main:
          bar.write(
            f'train step compiled in {train_fn.compile_s:.1f} s',
            file=sys.stderr,
          )
      done = step + 1
      bar.update(1)
      last = done == config.train.num_steps
      eval_now = done % config.eval.every_steps == 0 or last
      if done % config.train.log_every_steps == 0 or eval_now:
        values = _finite_logs(logs, done, rate, ckpt)
        if not logged:  # seconds; much less from the compilation cache
          values['compile_s'] = train_fn.compile_s
        logged = True
        logger.write(done, values)
        bar.set_postfix(
          loss=f'{values["loss"]:.4f}', img_s=f'{values["images_per_sec"]:.1f}'
        )
      step_metrics = None
      if eval_now:
        with multihost.busy('evaluating'):
          summary = evaluate_state(state)
        logger.write(done, _evaluation_record(summary))
        step_metrics = {'miou': summary['miou']}
        if is_main:
          bar.write(f'step {done}: mIoU {100 * summary["miou"]:.2f}')
      if ckpt.should_save(done) or last:
        with multihost.busy('checkpointing'):
          save(done, state, metrics=step_metrics, force=last)
      if stop.requested(done):
        if done not in ckpt.all_steps():
          save(done, state, force=True)
        ckpt.wait_until_finished()
        raise Preempted(done, ckpt.directory, interrupted=stop.interrupted)
  if not summary:  # a finished run asked to run again
    summary = run_dir.last_evaluation(workdir) or evaluate_state(state)
  return dict(summary, step=int(jax.device_get(state.step)))


def _label_spec(config: ml_collections.ConfigDict) -> labels.LabelSpec:
  """The data set's classes (an image folder's come with its data)."""
  if config.data.dataset == 'image_folder':
    return datasets.open_split(
      'image_folder', config.data.train_split, config.data.data_dir
    )[1]
  return datasets.label_spec(config.data.dataset)


def _check_config(config: ml_collections.ConfigDict, num_classes: int) -> None:
  """Refuses settings that would otherwise be clamped or fail late."""
  weights = config.loss.class_weights
  if weights is not None and (len(weights) != num_classes or min(weights) < 0):
    raise ConfigError(
      f'loss.class_weights has {len(weights)} values (min {min(weights)}); '
      f'{config.data.dataset} has {num_classes} classes: give one '
      'non-negative weight per class, in class id order'
    )
  remat_mode(config.model.remat)
  for key in (
    'train.num_steps',
    'train.log_every_steps',
    'eval.every_steps',
    'checkpoint.every_steps',
    'train.hang_timeout_s',
  ):
    group, name = key.split('.')
    value = config[group][name]
    if not value > 0:
      raise ConfigError(
        f'{key}={value} must be positive'
        + (' (a large value makes it rare)' if key != 'train.num_steps' else '')
      )
  # A published name that cannot load into the model: said before the
  # data set is opened or anything is downloaded.
  sources.check_arch(config.model.init_from, config.model.arch)


def training_view(
  model: nnx.Module, options: StepOptions, mesh: jax.sharding.Mesh
) -> nnx.Module:
  """The model as `mesh`'s devices train it: kernels for their platform,
  frozen BatchNorm, per-block remat and scanned blocks, as `options` ask;
  XLA's own convolutions on a spatial mesh, whose halo exchange XLA
  partitions (the patch, tap and Winograd lowerings reshape the height into
  tiles or slices, which made XLA gather whole activations)."""
  model = models.platform_view(model, models.platform_of(mesh))
  if sharding.spatial_size(mesh) > 1:
    model = nnx.view(model, conv_lowering='native')
  if options.freeze_bn:
    model = nnx.view(model, use_running_average=True)
  if options.remat == 'blocks':
    model = nnx.view(model, remat_blocks=True)
  if options.scan_blocks:
    model = nnx.view(model, scan_blocks=True)
  return model


def _input_config(config) -> pipeline.TrainInputConfig:
  return pipeline.TrainInputConfig(
    dataset=config.data.dataset,
    data_dir=config.data.data_dir,
    split=config.data.train_split,
    global_batch_size=config.train.batch_size,
    crop_size=tuple(config.data.crop_size),
    scale_range=tuple(config.data.scale_range),
    flip=config.data.flip,
    photometric=config.data.photometric,
    seed=config.seed,
    num_workers=config.data.num_workers,
    mean=tuple(config.data.mean),
    std=tuple(config.data.std),
  )


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


class _StopRequests:
  """SIGTERM / preemption and Ctrl-C, as flags read between steps."""

  def __init__(self):
    self.term = False
    self.interrupted = False

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (every host agrees)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.term or self.interrupted


@contextlib.contextmanager
def _stop_requests(is_main: bool) -> Iterator[_StopRequests]:
  """Installs the SIGTERM / SIGINT handlers for one process (several
  processes use JAX's preemption sync point); restores them on exit."""
  stop = _StopRequests()
  if jax.process_count() > 1:
    yield stop
    return

  # Only set flags: checkpointing inside a signal handler is unsafe. A
  # second Ctrl-C stops at once (the last committed step stays).
  def on_interrupt(*_):
    if stop.interrupted:
      raise KeyboardInterrupt
    stop.interrupted = True
    if is_main:
      print(
        '\ninterrupted: saving a checkpoint at the end of this step '
        '(Ctrl-C again to stop at once)',
        file=sys.stderr,
      )

  previous = {
    signal.SIGTERM: signal.signal(
      signal.SIGTERM, lambda *_: setattr(stop, 'term', True)
    ),
    signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt),
  }
  try:
    yield stop
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


class _Rate:
  """Images per second between successive log lines."""

  def __init__(self, step: int, batch_size: int):
    self.batch_size = batch_size
    self.last = (step, time.time())

  def restart(self, step: int) -> None:
    """Counts from `step`, now (after the step's compilation)."""
    self.last = (step, time.time())

  def __call__(self, step: int) -> float:
    now = time.time()
    rate = (step - self.last[0]) * self.batch_size / (now - self.last[1])
    self.last = (step, now)
    return rate


def _finite_logs(logs, done: int, rate: _Rate, ckpt) -> dict[str, float]:
  """The step's logs on the host, with images/s; stops a diverged run,
  keeping its last good checkpoint."""
  values = jax.device_get(logs)
  if not all(np.isfinite(v) for v in values.values()):
    ckpt.wait_until_finished()
    raise TrainingDivergedError(
      f'loss became {values["loss"]} between steps {rate.last[0]} and '
      f'{done}; the last good checkpoint is kept in {ckpt.directory} (step '
      f'{ckpt.latest_step()}). Lower optim.lr or check the data.'
    )
  values['images_per_sec'] = rate(done)
  return values


def _evaluation_record(summary: dict[str, Any]) -> dict[str, Any]:
  return {
    'miou': summary['miou'],
    'pixel_accuracy': summary['pixel_accuracy'],
    'per_class_iou': summary['per_class_iou'],
  }
