"""TFDS ArrayRecord source -> Grain -> per-host batches.

Training: each host reads its own shard of the split
(`tfds.split_for_jax_process`), shuffles with a seed, repeats, augments in
Grain workers and batches `global_batch / process_count` examples. The
iterator's state (a small JSON-able dict) goes into every checkpoint, so a
resumed run sees exactly the batches an uninterrupted one would.

Evaluation: every example of the split exactly once, at full resolution;
the last batch is padded with empty examples and every batch carries a
pixel `mask` (False on padding) so nothing is dropped or counted twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from deeplab_jax.data import datasets, transforms
from deeplab_jax.data.labels import IGNORE, LabelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainInputConfig:
  """What the training input needs (built from `config.data`)."""

  dataset: str
  data_dir: str | None
  split: str = 'train'
  global_batch_size: int
  crop_size: tuple[int, int]
  scale_range: tuple[float, float] = (0.5, 2.0)
  flip: bool = True
  photometric: bool = False
  seed: int = 0
  num_workers: int = 0
  mean: tuple[float, ...] = (123.675, 116.28, 103.53)
  std: tuple[float, ...] = (58.395, 57.12, 57.375)


def _host_split(split: str, process_index: int, process_count: int) -> str:
  if process_count == 1:
    return split
  return tfds.split_for_jax_process(
    split, process_index=process_index, process_count=process_count
  )


def train_dataset(
  cfg: TrainInputConfig,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tuple[grain.IterDataset, LabelSpec]:
  """The infinite, shuffled, augmented, batched per-host training dataset."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if cfg.global_batch_size % pc:
    raise ValueError(
      f'batch {cfg.global_batch_size} not divisible by {pc} processes'
    )
  source, spec = datasets.open_split(cfg.dataset, cfg.split, cfg.data_dir)
  if pc > 1:
    source, _ = datasets.open_split(
      cfg.dataset, _host_split(cfg.split, pi, pc), cfg.data_dir
    )
  augment = transforms.TrainAugment(
    lut=spec.lut,
    crop_size=tuple(cfg.crop_size),
    scale_range=tuple(cfg.scale_range),
    flip=cfg.flip,
    photometric=cfg.photometric,
    mean=tuple(cfg.mean),
    std=tuple(cfg.std),
  )
  ds = grain.MapDataset.source(source).shuffle(seed=cfg.seed).repeat()
  ds = ds.random_map(augment, seed=cfg.seed + 1)
  ds = ds.batch(cfg.global_batch_size // pc, drop_remainder=True)
  it = ds.to_iter_dataset()
  if cfg.num_workers > 0:
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=cfg.num_workers)
    )
  return it, spec


def _pad_batch(examples: list[dict], batch_size: int, hw: tuple[int, int]):
  h, w = hw
  image = np.zeros((batch_size, h, w, 3), np.float32)
  label = np.full((batch_size, h, w), IGNORE, np.int32)
  mask = np.zeros((batch_size, h, w), bool)
  for i, ex in enumerate(examples):
    eh, ew = ex['label'].shape
    image[i, :eh, :ew] = ex['image']
    label[i, :eh, :ew] = ex['label']
    mask[i, :eh, :ew] = True
  return {'image': image, 'label': label, 'mask': mask}


def eval_batches(
  dataset: str,
  split: str,
  *,
  data_dir: str | None,
  global_batch_size: int,
  mean=(123.675, 116.28, 103.53),
  std=(58.395, 57.12, 57.375),
  pad_to: tuple[int, int] | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Per-host padded evaluation batches covering the split exactly once.

  Host `i` of `n` takes examples `i, i + n, ...`; every host yields the same
  number of batches (padding with masked-out examples) so that collectives
  stay in step. Batches are padded to `pad_to` (required when image sizes
  vary across hosts) or to the largest example in the batch.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  source, spec = datasets.open_split(dataset, split, data_dir)
  prepare = transforms.EvalPrepare(lut=spec.lut, mean=mean, std=std)
  per_host = global_batch_size // pc
  mine = list(range(pi, len(source), pc))
  per_host_examples = (len(source) + pc - 1) // pc  # the busiest host
  num_batches = (per_host_examples + per_host - 1) // per_host
  for b in range(num_batches):
    examples = [
      prepare(source[i]) for i in mine[b * per_host : (b + 1) * per_host]
    ]
    if pad_to is not None:
      hw = tuple(pad_to)
    elif examples:
      hw = tuple(max(ex['label'].shape[d] for ex in examples) for d in (0, 1))
    else:
      hw = (32, 32)
    for ex in examples:
      if ex['label'].shape[0] > hw[0] or ex['label'].shape[1] > hw[1]:
        raise ValueError(
          f'eval image {ex["label"].shape} larger than eval.pad_to {hw}'
        )
    yield _pad_batch(examples, per_host, hw)
