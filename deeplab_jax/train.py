"""`train_and_evaluate(config, workdir)`: the training library (no flags).

Data-parallel over a `('data',)` mesh: the batch is sharded, parameters,
optimizer state and BatchNorm statistics are replicated (or split with
`mesh.param_sharding='fsdp'`), and one `jax.jit` step (state donated)
computes the loss over the global batch, so BatchNorm statistics are
synchronised across devices and hosts for free.

The steps themselves are in `steps` and the jitted programs that run them
are built by `programs`, which the planner and the benchmark share; this
module is the run around them: start checks, resume, the loop, evaluation,
checkpoints, logs and stop requests.

A workdir holds `config.json`, `metrics.jsonl`, TensorBoard events (`tb/`)
and checkpoints (`checkpoints/`). Starting with a workdir that has
checkpoints resumes from the latest one, data iterator included.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from deeplab_jax import (
  checkpointing,
  initialization,
  metrics,
  models,
  multihost,
  profiling,
  sharding,
)
from deeplab_jax.convert import sources
from deeplab_jax.data import datasets, labels, pipeline
from deeplab_jax.errors import CheckpointNotFoundError, ConfigError, UserError
from deeplab_jax.programs import programs_of
from deeplab_jax.run_dir import metrics_log, record, writer_lock
from deeplab_jax.step_options import remat_mode


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


# -------------------------------------------------------- evaluation ---


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

  A workdir has one writer: process 0 holds `writer_lock.WriterLock` for the
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
  if jax.process_index() == 0 and not record.is_remote(workdir):
    lock = writer_lock.WriterLock(workdir, on_lost=multihost.stop_job)
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
  record.check_path(workdir)
  if lock is None:
    logging.warning(
      '%s has no writer lock (remote storage): make sure that one job '
      'writes it at a time (docs/distributed.md)',
      workdir,
    )
    record.check(config, workdir)
    return
  lock.acquire()
  try:
    record.check(config, workdir)
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
      raise CheckpointNotFoundError(
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
      record.claim(config, workdir)
    logger = cleanup.enter_context(metrics_log.MetricsLog(workdir, is_main))
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
    profiler = profiling.StepProfiler(
      workdir,
      config.train.profile_steps,
      plan_row=profiling.plan_row(
        config.train.profile_plan, config, jax.device_count()
      ),
      enabled=is_main,
    )
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
      state, logs = profiler.run(step + 1, train_fn, state, batch)
      if step == first_step:
        rate.restart(first_step)  # images/s without the compilation
        if is_main:
          bar.write(
            f'train step compiled in {train_fn.compile_s:.1f} s',
            file=sys.stderr,
          )
      done = step + 1
      bar.update(1)
      if profiler.record and done == profiler.steps[-1]:
        logger.write(done, profiler.record)
        bar.write(profiling.summary(profiler), file=sys.stderr)
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
    summary = metrics_log.last_evaluation(workdir) or evaluate_state(state)
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
  profiling.parse_steps(config.train.profile_steps)
  # A published name that cannot load into the model: said before the
  # data set is opened or anything is downloaded.
  sources.check_arch(config.model.init_from, config.model.arch)


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
