"""TFDS ArrayRecord source -> Grain -> per-host batches.

Training: one seeded global order of (augmented) examples; each host reads
only its slice of every global batch, in Grain workers, as uint8 images and
labels (the train step normalises on the device). The data state is
the step, so a resumed run sees exactly the batches an uninterrupted one
would, on any number of hosts, devices or workers (see `train_dataset`).

Evaluation: every example of the split exactly once, at full resolution;
the last batch is padded with empty examples and every batch carries a
pixel `mask` (False on padding) so nothing is dropped or counted twice.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import grain
import jax
import numpy as np

from deeplab_jax.data import datasets, normalization, transforms
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
  mean: tuple[float, ...] = normalization.IMAGENET[0]
  std: tuple[float, ...] = normalization.IMAGENET[1]


def train_dataset(
  cfg: TrainInputConfig,
  *,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tuple[grain.IterDataset, LabelSpec]:
  """This host's part of the training batches, from `start_step` on.

  One global order for every host count: the split is shuffled with the
  seed and repeated, example `p` of that order is augmented with a random
  stream derived from `p`, and global batch `b` is positions
  `[b * G, (b + 1) * G)`. Host `i` of `n` reads only its slice
  `[b * G + i * G / n, b * G + (i + 1) * G / n)`. The data state is
  therefore just the step: resuming at step `s` on any number of hosts,
  devices or workers sees exactly the batches an uninterrupted run would.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  g = cfg.global_batch_size
  if g % pc:
    raise ValueError(f'batch {g} not divisible by {pc} processes')
  per_host = g // pc
  source, spec = datasets.open_split(cfg.dataset, cfg.split, cfg.data_dir)
  augment = transforms.TrainAugment(
    lut=spec.lut,
    crop_size=tuple(cfg.crop_size),
    scale_range=tuple(cfg.scale_range),
    flip=cfg.flip,
    photometric=cfg.photometric,
    mean=tuple(cfg.mean),
    std=tuple(cfg.std),
  )
  ordered = grain.MapDataset.source(source).shuffle(seed=cfg.seed).repeat()
  ordered = ordered.random_map(augment, seed=cfg.seed + 1)
  owner = _HostPositions(ordered, g, per_host, pi)
  start = start_step * per_host
  ds = grain.MapDataset.range(start, _ENDLESS).map(owner)
  ds = ds.batch(per_host, drop_remainder=True)
  it = ds.to_iter_dataset()
  if cfg.num_workers > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():
      # Grain's workers read absl flags; outside absl.app (notebooks,
      # tests) they would raise UnparsedFlagAccessError.
      flags.FLAGS(sys.argv[:1], known_only=True)
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=cfg.num_workers)
    )
  return it, spec


_ENDLESS = 2**50  # positions; far beyond any run


@dataclasses.dataclass(frozen=True)
class _HostPositions:
  """Host-local position `k` -> the example at its global position."""

  ordered: grain.MapDataset
  global_batch: int
  per_host: int
  process_index: int

  def __call__(self, k: int) -> dict:
    b, j = divmod(k, self.per_host)
    return self.ordered[
      b * self.global_batch + self.process_index * self.per_host + j
    ]


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
  mean=normalization.IMAGENET[0],
  std=normalization.IMAGENET[1],
  pad_to: tuple[int, int] | None = None,
  height_multiple: int = 1,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Per-host padded evaluation batches covering the split exactly once.

  Host `i` of `n` takes examples `i, i + n, ...`; every host yields the same
  number of batches (padding with masked-out examples) so that collectives
  stay in step. Batches are padded to `pad_to` (required when image sizes
  vary across hosts) or to the largest example in the batch, the height
  then rounded up to `height_multiple` (a spatial mesh axis splits it).
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
    hw = (-(-hw[0] // height_multiple) * height_multiple, hw[1])
    for ex in examples:
      if ex['label'].shape[0] > hw[0] or ex['label'].shape[1] > hw[1]:
        raise ValueError(
          f'eval image {ex["label"].shape} larger than eval.pad_to {hw}'
        )
    yield _pad_batch(examples, per_host, hw)
