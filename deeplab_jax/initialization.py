"""The model a training run starts from: fresh, converted from published
or PyTorch weights, or copied from a checkpoint (`config.model.init_from`)."""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from deeplab_jax import checkpointing, models
from deeplab_jax.convert import sources
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.errors import ConfigError


def create_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  *,
  resuming: bool = False,
):
  """The model a run starts from: `config.model.arch` with fresh weights, or
  with those of `config.model.init_from`: a published name
  (`deeplab_jax.convert.sources`, e.g. `hf-hub:timm/densenet161.tv_in1k`), a
  PyTorch / safetensors / `.npz` file, or a deeplab-jax checkpoint. Every
  tensor whose path and shape match is copied; the rest (a fresh head, or
  a classifier for other classes) keeps its initialisation, and a warning
  names it. `model.init_source` records the source's name, file and
  SHA-256 (checkpoint metadata `init_from`).

  `resuming`: the run's checkpoint replaces every weight, so `init_from`
  is neither fetched nor read (a resumed run needs neither the network
  nor the weights cache); the model has fresh weights until the restore."""
  options = dict(config.model.options.to_dict())
  options.setdefault('dtype', config.model.dtype)
  src = '' if resuming else config.model.init_from
  fresh = lambda: models.create(
    config.model.arch,
    num_classes=num_classes,
    rngs=nnx.Rngs(config.seed),
    **options,
  )
  if not src:
    return fresh()
  sources.check_arch(src, config.model.arch)
  if sources.is_weights_file(src):
    state_dict, fetched = sources.read(src)
    source_classes = torch_convert.source_num_classes(state_dict)
    loaded = torch_convert.load(
      config.model.arch,
      state_dict,
      num_classes=source_classes or num_classes,
      seed=config.seed,
      **options,
    )
    logging.info('init_from %s (%s)', src, loaded.source_layout)
    norm = (
      fetched.source.normalization
      if fetched.source
      else loaded.source_normalization
    )
    warn_if_normalization_differs(config, src, norm, loaded.fresh_weights)
    model = loaded
    if loaded.num_classes != num_classes:
      model = _copy_matching(loaded, fresh(), src)
    model.init_source = (fetched.name, fetched.path, fetched.sha256)
    return model
  loaded, meta = checkpointing.load_model(
    src, allow_unverified=config.checkpoint.allow_unverified
  )
  if meta['model']['arch'] != config.model.arch:
    raise ConfigError(
      f'model.init_from {src} holds {meta["model"]["arch"]}, not '
      f'{config.model.arch}'
    )
  model = _copy_matching(loaded, fresh(), src)
  norm = meta.get('normalization')
  if norm:
    warn_if_normalization_differs(config, src, (norm['mean'], norm['std']), ())
  model.init_source = (src, checkpointing.resolve_path(src), '')
  return model


def init_record(model) -> dict[str, str] | None:
  """The checkpoint metadata entry `init_from`: the source's name, the file
  read and its SHA-256 (empty for a checkpoint directory)."""
  source = getattr(model, 'init_source', None)
  if not source:
    return None
  return dict(zip(('name', 'file', 'sha256'), source, strict=True))


def _copy_matching(source: nnx.Module, model: nnx.Module, src: str):
  """Copies every weight of `source` whose path and shape match into
  `model`; the rest (e.g. a classifier for another number of classes) keeps
  its initialisation, and a warning names it."""
  _, src_w, _ = nnx.split(source, (nnx.Param, nnx.BatchStat), ...)
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
      "initialisation (ours vs the source's shape): %s%s",
      src,
      kept,
      len(skipped),
      ', '.join(skipped[:4]),
      ' ...' if len(skipped) > 4 else '',
    )
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
