"""The model a training run starts from: fresh, converted from PyTorch
weights, or copied from a checkpoint (`config.model.init_from`)."""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from deeplab_jax import checkpointing, models
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.errors import ConfigError


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The model a run starts from: `config.model.arch` with fresh weights, or
  with those of `config.model.init_from` (a PyTorch `.pth` / `.npz`, or a
  checkpoint: every tensor whose path and shape match is copied)."""
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
    model = torch_convert.load(
      config.model.arch,
      torch_convert.read_state_dict(src),
      num_classes=num_classes,
      seed=config.seed,
      **options,
    )
    logging.info('init_from %s (%s)', src, model.source_layout)
    warn_if_normalization_differs(
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
    warn_if_normalization_differs(config, src, (norm['mean'], norm['std']), ())
  return model


def warn_if_normalization_differs(config, src, source_norm, fresh) -> None:
  """Warns when `src` was trained on other input statistics than
  `config.data`'s: fine-tuning then starts from a shifted input (it may be
  intended). Weights with a fresh backbone (`fresh`) are not checked."""
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
