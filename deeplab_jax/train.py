"""`train_and_evaluate(config, workdir)`: the training library (no flags).

Data-parallel over a `('data',)` mesh: the batch is sharded, parameters,
optimizer state and BatchNorm statistics are replicated, and one `jax.jit`
step (state donated) computes the loss over the global batch, so BatchNorm
statistics are synchronised across devices and hosts for free.

A workdir holds `config.json`, `metrics.jsonl`, TensorBoard events (`tb/`)
and checkpoints (`checkpoints/`). Starting with a workdir that has
checkpoints resumes from the latest one, data iterator included.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from deeplab_jax import (
  checkpointing,
  losses,
  metrics,
  models,
  multihost,
  optim,
  sharding,
)
from deeplab_jax.data import datasets, pipeline, transforms
from deeplab_jax.errors import ConfigError, UserError
from deeplab_jax.predict import inference_view

# Config groups whose change makes a workdir's checkpoints incompatible.
_RUN_IDENTITY = ('model', 'data.dataset', 'data.crop_size', 'train.batch_size')


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


# ---------------------------------------------------------------- state ---


def _split(model: nnx.Module):
  graphdef, params, stats, rest = nnx.split(
    model, nnx.Param, nnx.BatchStat, ...
  )
  return graphdef, params, stats, rest


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


def _flat_config(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_config(v, f'{prefix}.{k}' if prefix else k))
  return out


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run of another config, naming each
  differing key with both values. Writes nothing: `_claim_workdir` does,
  once training starts, so a run that fails before its first step (no
  data, a bad `init_from`) leaves the workdir free for the fixed command."""
  path = epath.Path(workdir, 'config.json')
  if not path.exists():
    return
  ours = _flat_config(json.loads(config.to_json_best_effort()))
  theirs = _flat_config(json.loads(path.read_text()))
  identity = lambda key: any(
    key == group or key.startswith(group + '.') for group in _RUN_IDENTITY
  )
  diff = [
    f'{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now'
    for k in sorted(set(ours) | set(theirs))
    if identity(k) and ours.get(k) != theirs.get(k)
  ]
  if diff:
    raise ConfigError(
      f'{workdir} holds a run of another config ({"; ".join(diff)}); use '
      'a new --workdir or the same config'
    )


def _claim_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config into the workdir (training has started)."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  epath.Path(workdir, 'config.json').write_text(
    json.dumps(json.loads(config.to_json_best_effort()), indent=2)
  )


def _init_model(config: ml_collections.ConfigDict, num_classes: int):
  options = dict(config.model.options.to_dict())
  options.setdefault('dtype', config.model.dtype)
  src = config.model.init_from
  if not src:
    return models.create(
      config.model.arch,
      num_classes=num_classes,
      rngs=nnx.Rngs(config.seed),
      **options,
    )
  if src.endswith(('.pth', '.pt', '.npz')):
    from deeplab_jax.convert import torch as torch_convert

    model = torch_convert.load(
      config.model.arch,
      torch_convert.read_state_dict(src),
      num_classes=num_classes,
      seed=config.seed,
      **options,
    )
    logging.info('init_from %s (%s)', src, model.source_layout)
    _warn_if_normalization_differs(
      config, src, model.source_normalization, model.fresh_weights
    )
    return model
  model = models.create(
    config.model.arch,
    num_classes=num_classes,
    rngs=nnx.Rngs(config.seed),
    **options,
  )
  loaded, meta = checkpointing.load_model(
    src, allow_unverified=config.checkpoint.allow_unverified
  )
  if meta['model']['arch'] != config.model.arch:
    raise ConfigError(
      f'model.init_from {src} holds {meta["model"]["arch"]}, not '
      f'{config.model.arch}'
    )
  # Copy every weight whose path and shape match; the rest (e.g. a
  # classifier for another number of classes) keeps its initialisation.
  _, src_w, _ = nnx.split(loaded, (nnx.Param, nnx.BatchStat), ...)
  _, dst_w, _ = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
  src_flat = dict(nnx.to_flat_state(src_w))
  kept, skipped = 0, []
  for path, var in nnx.to_flat_state(dst_w):
    other = src_flat.get(path)
    if other is not None and other[...].shape == var[...].shape:
      # As host data: the loaded array is committed to one device, and the
      # state is then created sharded over the mesh.
      var[...] = np.asarray(other[...])
      kept += 1
    else:
      shape = 'absent' if other is None else tuple(other[...].shape)
      skipped.append(
        f'{".".join(map(str, path))} {tuple(var[...].shape)} vs {shape}'
      )
  nnx.update(model, dst_w)
  if skipped:
    logging.warning(
      'model.init_from %s: %d tensors loaded, %d keep their random '
      "initialisation (ours vs the checkpoint's shape): %s%s",
      src,
      kept,
      len(skipped),
      ', '.join(skipped[:4]),
      ' ...' if len(skipped) > 4 else '',
    )
  norm = meta.get('normalization')
  if norm:
    _warn_if_normalization_differs(config, src, (norm['mean'], norm['std']), ())
  return model


def _warn_if_normalization_differs(config, src, source_norm, fresh) -> None:
  """Fine-tuning from weights trained on other input statistics starts
  from a shifted input; say so (it may be intended)."""
  if 'backbone' in fresh:
    return
  mean, std = source_norm
  ours = (tuple(config.data.mean), tuple(config.data.std))
  if not np.allclose(ours, (tuple(mean), tuple(std)), rtol=1e-4):
    logging.warning(
      'model.init_from %s was trained on inputs normalised with mean %s std '
      '%s, but data.mean / data.std are %s / %s: set them to match unless '
      'the change is intended',
      src,
      [round(v, 3) for v in mean],
      [round(v, 3) for v in std],
      list(ours[0]),
      list(ours[1]),
    )


# ------------------------------------------------------------ the steps ---


def _make_steps(
  config,
  graphdef,
  eval_graphdef,
  rest_template,
  tx,
  schedule,
  num_classes,
  mesh,
):
  class_weights = config.loss.class_weights
  ohem = config.loss.ohem_thresh or None
  ema_decay = config.optim.ema_decay
  accum = config.optim.grad_accum_steps
  base_key = jax.random.key(config.seed)
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  def loss_terms(out, labels):
    ce = lambda logits: losses.cross_entropy(
      logits,
      labels,
      class_weights=class_weights,
      ohem_thresh=ohem,
      ohem_min_kept=config.loss.ohem_min_kept,
    )
    loss = ce(out['out'])
    if 'aux' in out and config.loss.aux_weight:
      loss = loss + config.loss.aux_weight * ce(out['aux'])
    return loss

  def train_step(state, batch):
    rngs = _step_rngs(
      rest_template, jax.random.fold_in(base_key, state['step'])
    )

    def forward(params, stats, rngs, images):
      model = nnx.merge(graphdef, params, stats, rngs)
      out = model(images)
      return out, nnx.to_pure_dict(_split(model)[2])

    if config.model.remat in (True, 'full'):
      # Recompute the whole forward pass during backward: activation
      # memory of one layer at a time for about a third more compute.
      # ('blocks' rematerialises each backbone block instead: see
      # train_and_evaluate.)
      forward = jax.checkpoint(forward)

    images = transforms.normalize_on_device(batch['image'], mean, std)
    labels = batch['label'].astype(jnp.int32)

    def loss_fn(params):
      out, stats = forward(params, state['batch_stats'], rngs, images)
      return loss_terms(out, labels), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state['params']
    )
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = dict(state, params=params, batch_stats=stats, opt_state=opt_state)
    new['step'] = state['step'] + 1
    if ema_decay:
      ema = optim.ema_update(state['ema'], params, ema_decay)
      if accum > 1:  # only the micro-steps that update the parameters
        applied = (state['step'] + 1) % accum == 0
        ema = jax.tree.map(
          lambda e, old: jnp.where(applied, e, old), ema, state['ema']
        )
      new['ema'] = ema
    logs = {
      'loss': loss,
      'lr': schedule(state['step']),
      'grad_norm': optax.tree.norm(grads),
    }
    return new, logs

  def eval_step(params, stats, batch):
    rngs = _step_rngs(rest_template, base_key)
    model = nnx.merge(eval_graphdef, params, stats, rngs)
    logits = model(batch['image'])['out']
    pred = jnp.argmax(logits, axis=-1)

    return metrics.sharded_confusion_matrix(
      pred, batch['label'], batch['mask'], num_classes, mesh
    )

  return train_step, eval_step


# ---------------------------------------------------------------- logging ---


class _Logger:
  """metrics.jsonl (appended across resumes) + TensorBoard, process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter

      self._jsonl = epath.Path(workdir, 'metrics.jsonl').open('a')
      self._writer = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': step}
    for k, v in values.items():
      if isinstance(v, dict):
        record[k] = v
        for name, x in v.items():
          if x == x:  # not NaN
            self._writer.add_scalar(f'{k}/{name}', x, step)
      else:
        record[k] = float(v)
        self._writer.add_scalar(k, float(v), step)
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._writer.close()


# ------------------------------------------------------------ main loop ---


def evaluate_params(
  config, eval_step, params, stats, mesh, class_names
) -> dict[str, Any]:
  """mIoU etc. over the whole eval split (padded batches, nothing dropped)."""
  num_classes = len(class_names)
  total = jnp.zeros((num_classes, num_classes), jnp.int32)
  for batch in pipeline.eval_batches(
    config.data.dataset,
    config.data.eval_split,
    data_dir=config.data.data_dir,
    global_batch_size=config.eval.batch_size,
    mean=tuple(config.data.mean),
    std=tuple(config.data.std),
    pad_to=config.data.eval_pad_to,
  ):
    total = total + eval_step(params, stats, sharding.to_global(batch, mesh))
  return metrics.summarize(np.asarray(jax.device_get(total)), class_names)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it has checkpoints).

  Returns:
    The last evaluation summary (`miou`, per-class IoU, ...) and the final
    step, as a dict.
  """
  workdir = checkpointing.resolve_path(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.shape)
  sharding.check_batch_size(config.train.batch_size, mesh)
  if is_main:
    _check_workdir(config, workdir)

  input_cfg = pipeline.TrainInputConfig(
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
  spec = datasets.label_spec(config.data.dataset)
  if config.data.dataset == 'image_folder':
    spec = datasets.open_split(
      'image_folder', config.data.train_split, config.data.data_dir
    )[1]
  class_names = spec.class_names
  weights = config.loss.class_weights
  if weights is not None and (
    len(weights) != spec.num_classes or min(weights) < 0
  ):
    raise ConfigError(
      f'loss.class_weights has {len(weights)} values (min {min(weights)}); '
      f'{config.data.dataset} has {spec.num_classes} classes: give one '
      'non-negative weight per class, in class id order'
    )

  model = _init_model(config, spec.num_classes)
  if config.model.freeze_bn:
    model = nnx.view(model, use_running_average=True)
  if config.model.remat not in (False, True, 'none', 'full', 'blocks'):
    raise ConfigError(
      f"model.remat must be False, True/'full' or 'blocks', not "
      f'{config.model.remat!r}'
    )
  if config.model.remat == 'blocks':
    model = nnx.view(model, remat_blocks=True)
  graphdef, params, stats, rest = _split(model)
  eval_model = inference_view(model)
  eval_graphdef = _split(eval_model)[0]
  rest_template = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(rest)
  )
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  replicated = sharding.replicated(mesh)

  params = nnx.to_pure_dict(params)
  stats = nnx.to_pure_dict(stats)

  def init_state(params, stats):
    state = {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'batch_stats': stats,
      'opt_state': tx.init(params),
    }
    if config.optim.ema_decay:
      state['ema'] = jax.tree.map(jnp.copy, params)
    return state

  # State is created directly with its sharding (replicated, or split over
  # the data axis with `mesh.param_sharding='fsdp'`).
  state_shapes = jax.eval_shape(init_state, params, stats)
  state_sharding = sharding.state_shardings(
    state_shapes, mesh, config.mesh.param_sharding
  )
  state = jax.jit(init_state, out_shardings=state_sharding)(params, stats)
  del model, params, stats

  train_step, eval_step = _make_steps(
    config,
    graphdef,
    eval_graphdef,
    rest_template,
    tx,
    schedule,
    spec.num_classes,
    mesh,
  )
  data_sharding = sharding.data_sharding(mesh)
  train_step = multihost.meet_before_first_run(
    jax.jit(
      train_step,
      in_shardings=(state_sharding, data_sharding),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
    ),
    'train step compiled',
  )
  eval_key = 'ema' if config.optim.ema_decay else 'params'
  eval_step = multihost.meet_before_first_run(
    jax.jit(
      eval_step,
      in_shardings=(
        state_sharding[eval_key],
        state_sharding['batch_stats'],
        data_sharding,
      ),
      out_shardings=replicated,
    ),
    'eval step compiled',
  )

  # Orbax's first collective follows: hosts meet after their unequal work
  # (process 0 checks the workdir, model init compiles).
  multihost.meet('checkpointer')

  ckpt = checkpointing.TrainCheckpointer(
    os.path.join(workdir, 'checkpoints'),
    every_steps=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    allow_unverified=config.checkpoint.allow_unverified,
  )
  # The `model` item holds the weights evaluation uses: the EMA when one is
  # kept (then the raw parameters travel in the `train` item), so that
  # scripts.evaluate / predict / export load what training evaluated.
  model_key = 'ema' if config.optim.ema_decay else 'params'
  meta = checkpointing.metadata_record(
    registry_description(config, spec.num_classes),
    class_names=class_names,
    mean=config.data.mean,
    std=config.data.std,
    extra={'dataset': config.data.dataset, 'weights': model_key},
  )

  def weights_of(state):
    merged = checkpointing.deep_merge(state[model_key], state['batch_stats'])
    return checkpointing.stringify_keys(merged)

  def train_part(state):
    return {
      k: v for k, v in state.items() if k not in (model_key, 'batch_stats')
    }

  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    state,
  )
  restored = ckpt.restore_latest(
    abstract_weights=weights_of(abstract),
    abstract_train=train_part(abstract),
  )
  if restored is not None:
    start, weights, train, data_state = restored
    if (
      data_state.get('seed') != config.seed
      or data_state.get('global_batch_size') != config.train.batch_size
    ):
      raise ConfigError(
        f'checkpoint {start} was trained with seed {data_state.get("seed")} '
        f'and batch {data_state.get("global_batch_size")}; resuming with '
        'others would not replay the same data'
      )
    weights = checkpointing.restore_keys(
      weights, checkpointing.deep_merge(state[model_key], state['batch_stats'])
    )
    state = dict(
      train,
      **{model_key: checkpointing.split_like(weights, state[model_key])},
      batch_stats=checkpointing.split_like(weights, state['batch_stats']),
    )
    logging.info('resumed from step %d in %s', start, ckpt.directory)
  first_step = int(jax.device_get(state['step']))
  train_ds, _ = pipeline.train_dataset(input_cfg, start_step=first_step)
  train_iter = iter(train_ds)

  stop = {'term': False, 'int': False}
  handlers = {}
  if jax.process_count() == 1:
    # Only set flags: checkpointing inside a signal handler is unsafe. A
    # second Ctrl-C stops at once (the last committed step stays).
    def on_interrupt(*_):
      if stop['int']:
        raise KeyboardInterrupt
      stop['int'] = True
      if is_main:
        print(
          '\ninterrupted: saving a checkpoint at the end of this step '
          '(Ctrl-C again to stop at once)',
          file=sys.stderr,
        )

    handlers = {
      signal.SIGTERM: signal.signal(
        signal.SIGTERM, lambda *_: stop.__setitem__('term', True)
      ),
      signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt),
    }
  # After the handlers: a signal from here on is a flag, never an exception
  # that would leave the TensorBoard writer's thread running.
  if is_main:
    _claim_workdir(config, workdir)
  logger = _Logger(workdir, is_main)

  def preempted(step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return stop['term']

  from tqdm import tqdm

  bar = tqdm(
    total=config.train.num_steps,
    initial=first_step,
    disable=not is_main,
    desc='train',
    dynamic_ncols=True,
  )
  summary: dict[str, Any] = {}
  last_log = (first_step, time.time())
  last_good = first_step
  logs = None
  eval_params = (
    (lambda s: s['ema']) if config.optim.ema_decay else (lambda s: s['params'])
  )

  def evaluate_state():
    return evaluate_params(
      config,
      eval_step,
      eval_params(state),
      state['batch_stats'],
      mesh,
      class_names,
    )

  def save(step: int, *, metrics_=None, force=False):
    ckpt.save(
      step,
      weights=weights_of(state),
      train_state=train_part(state),
      data_state={
        'seed': config.seed,
        'global_batch_size': config.train.batch_size,
        'global_next_index': step * config.train.batch_size,
      },
      meta=meta,
      metrics=metrics_,
      force=force,
    )

  try:
    for step in range(first_step, config.train.num_steps):
      batch = sharding.to_global(next(train_iter), mesh)
      state, logs = train_step(state, batch)
      done = step + 1
      bar.update(1)
      eval_now = done % config.eval.every_steps == 0 or (
        done == config.train.num_steps
      )
      if done % config.train.log_every_steps == 0 or eval_now:
        values = jax.device_get(logs)
        if not all(np.isfinite(v) for v in values.values()):
          ckpt.wait_until_finished()
          raise TrainingDivergedError(
            f'loss became {values["loss"]} between steps {last_good} and '
            f'{done}; the last good checkpoint is kept in {ckpt.directory} '
            f'(step {ckpt.latest_step()}). Lower optim.lr or check the data.'
          )
        last_good = done
        now = time.time()
        img_s = (
          (done - last_log[0]) * config.train.batch_size / (now - last_log[1])
        )
        last_log = (done, now)
        values['images_per_sec'] = img_s
        logger.write(done, values)
        bar.set_postfix(loss=f'{values["loss"]:.4f}', img_s=f'{img_s:.1f}')
      step_metrics = None
      if eval_now:
        summary = evaluate_state()
        logger.write(
          done,
          {
            'miou': summary['miou'],
            'pixel_accuracy': summary['pixel_accuracy'],
            'per_class_iou': summary['per_class_iou'],
          },
        )
        step_metrics = {'miou': summary['miou']}
        if is_main:
          bar.write(f'step {done}: mIoU {100 * summary["miou"]:.2f}')
      if ckpt.should_save(done) or done == config.train.num_steps:
        save(done, metrics_=step_metrics, force=done == config.train.num_steps)
      if preempted(done) or stop['int']:
        if done not in ckpt.all_steps():
          save(done, force=True)
        ckpt.wait_until_finished()
        raise Preempted(done, ckpt.directory, interrupted=stop['int'])
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
    bar.close()
    ckpt.wait_until_finished()
    ckpt.close()
    logger.close()
  if not summary:  # a finished run asked to run again
    summary = _last_evaluation(workdir) or evaluate_state()
  summary = dict(summary)
  summary['step'] = int(jax.device_get(state['step']))
  return summary


def _last_evaluation(workdir: str) -> dict[str, Any] | None:
  """The last evaluation record of `metrics.jsonl`, if any."""
  path = epath.Path(workdir, 'metrics.jsonl')
  if not path.exists():
    return None
  last = None
  for line in path.read_text().splitlines():
    record = json.loads(line) if line.strip() else {}
    if 'miou' in record:
      last = record
  return last


def registry_description(config, num_classes: int) -> dict[str, Any]:
  """The `meta['model']` record of a training run (arch + full config)."""
  options = dict(config.model.options.to_dict())
  options.setdefault('dtype', config.model.dtype)
  cfg = models.registry.make_config(config.model.arch, **options)
  import dataclasses

  return {
    'arch': config.model.arch,
    'num_classes': num_classes,
    'config': dataclasses.asdict(cfg),
  }
