"""The training input's throughput: steady-state Grain batches, and what
one core does per image."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from deeplab_jax.data import datasets, pipeline, transforms


def input_pipeline(
  dataset: str,
  data_dir: str,
  *,
  crop: tuple[int, int],
  batch: int,
  workers: int,
  batches: int,
) -> dict[str, Any]:
  """Training-input images/s in steady state, with `workers` Grain worker
  processes (0: Grain's reading threads in this process).

  Grain reads ahead in 16 threads per process, so the first batches come
  partly from work done while the first one was awaited; only the second
  half of `batches` is timed, by which time the consumer (which does
  nothing else) has emptied whatever was read ahead.
  """
  cfg = pipeline.TrainInputConfig(
    dataset=dataset,
    data_dir=data_dir,
    global_batch_size=batch,
    crop_size=crop,
    num_workers=workers,
    photometric=True,
  )
  it = iter(pipeline.train_dataset(cfg, process_index=0, process_count=1)[0])
  stamps = []
  for _ in range(batches):
    next(it)
    stamps.append(time.perf_counter())
  half = batches // 2
  timed = batches - half
  return {
    'framework': 'grain',
    'dataset': dataset,
    'workers': workers,
    'crop': f'{crop[0]}x{crop[1]}',
    'batches_timed': timed,
    'input_img_s': timed * batch / (stamps[-1] - stamps[half - 1]),
  }


def decode_and_augment(
  dataset: str, data_dir: str, *, crop: tuple[int, int], images: int
) -> dict[str, Any]:
  """What one core does per training image, in this thread alone: read and
  decode the example from the TFDS source, then the training augmentation
  (`transforms.TrainAugment`, photometric on), each timed separately."""
  source, spec = datasets.open_split(dataset, 'train', data_dir)
  augment = transforms.TrainAugment(
    lut=spec.lut, crop_size=tuple(crop), photometric=True
  )
  rng = np.random.default_rng(0)
  augment(source[0], rng)  # imports and first-call set-up, untimed
  decode_s = augment_s = 0.0
  for i in range(images):
    t = time.perf_counter()
    example = source[i % len(source)]
    decode_s += time.perf_counter() - t
    t = time.perf_counter()
    augment(example, rng)
    augment_s += time.perf_counter() - t
  return {
    'framework': 'numpy',
    'dataset': dataset,
    'workers': 'one core',
    'crop': f'{crop[0]}x{crop[1]}',
    'decode_ms_per_img': 1e3 * decode_s / images,
    'augment_ms_per_img': 1e3 * augment_s / images,
    'input_img_s': images / (decode_s + augment_s),
  }
