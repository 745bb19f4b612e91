"""Exact evaluation: whole image, sliding window, multi-scale + flip.

`evaluate` runs a model over a whole split and returns mIoU, per-class IoU
and accuracy, pixel accuracy, mean accuracy and frequency-weighted IoU.
Every example is counted exactly once: examples are batched only with
examples of the same size (so no image is padded and its prediction is the
one it gets alone), and the last batch of each size is filled with
masked-out copies. Batches are split over the local devices; with several
processes each evaluates its slice and the confusion matrices are summed.

Inference modes (`InferenceMode`), following mmsegmentation's `whole` /
`slide` test modes and its test-time augmentation:
- whole: the image at once.
- slide: windows of `crop` every `stride` (the last window of a row or
  column is moved back inside the image); overlapping logits averaged.
- scales / flip: the image resized by each scale (and mirrored), logits
  resized back, softmax scores averaged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from deeplab_jax import figures, metrics, multihost, program_memory, sharding
from deeplab_jax.data import datasets, transforms
from deeplab_jax.data import labels as label_tables
from deeplab_jax.errors import ConfigError, UserError
from deeplab_jax.models import platform_of
from deeplab_jax.models.layers import resize_bilinear
from deeplab_jax.predict import inference_view
from deeplab_jax.run_dir import metrics_log


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceMode:
  """How an image becomes class scores.

  Attributes:
    mode: `'whole'` or `'slide'`.
    crop: `(h, w)` window of the slide mode.
    stride: `(h, w)` step between windows (default: two thirds of `crop`).
    scales: image scale factors; `(1.0,)` = the image as is.
    flip: also run the horizontally mirrored image.
  """

  mode: str = 'whole'
  crop: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False

  def __post_init__(self):
    if self.mode not in ('whole', 'slide'):
      raise ConfigError(f"mode must be 'whole' or 'slide', not {self.mode!r}")
    if self.mode == 'slide' and not self.crop:
      raise ConfigError('the slide mode needs a crop size (e.g. 512x1024)')
    if not self.scales or min(self.scales) <= 0:
      raise ConfigError(f'scales must be positive, got {self.scales}')

  @property
  def window_stride(self) -> tuple[int, int]:
    if self.stride:
      return tuple(self.stride)
    return tuple(max(1, (2 * c) // 3) for c in self.crop)

  @property
  def averages_scores(self) -> bool:
    """Whether several softmax scores are averaged (else raw logits)."""
    return self.flip or tuple(self.scales) != (1.0,)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """Start offsets of the windows along one axis (mmsegmentation's rule):
  `ceil((size - crop) / stride) + 1` windows, the last one moved back so it
  ends at the border; one window of the whole axis if `size <= crop`."""
  n = max(size - crop + stride - 1, 0) // stride + 1
  return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


def slide_logits(
  apply: Callable[[jax.Array], jax.Array],
  images: jax.Array,
  crop: Sequence[int],
  stride: Sequence[int],
) -> jax.Array:
  """Logits of `[B, H, W, 3]` images from overlapping windows.

  All windows of the batch go through `apply` as one batch; each pixel's
  logits are the mean over the windows that cover it.
  """
  b, h, w, _ = images.shape
  ch, cw = min(crop[0], h), min(crop[1], w)
  boxes = [
    (y, x)
    for y in window_starts(h, ch, stride[0])
    for x in window_starts(w, cw, stride[1])
  ]
  if len(boxes) == 1:  # the window is the image
    return apply(images)
  windows = jnp.concatenate(
    [images[:, y : y + ch, x : x + cw] for y, x in boxes], axis=0
  )
  out = apply(windows)
  # Accumulate with pads rather than scatter-adds: fuses well, and avoids
  # an XLA:CPU crash seen with scatter-adds of mirrored inputs.
  total = 0.0
  count = np.zeros((h, w), np.float32)
  for i, (y, x) in enumerate(boxes):
    pads = ((0, 0), (y, h - y - ch), (x, w - x - cw), (0, 0))
    total = total + jnp.pad(out[i * b : (i + 1) * b], pads)
    count[y : y + ch, x : x + cw] += 1
  return total / jnp.asarray(count)[None, :, :, None]


def _scaled_size(hw: Sequence[int], scale: float) -> tuple[int, int]:
  return tuple(max(1, int(d * scale + 0.5)) for d in hw)


def scores(
  apply: Callable[[jax.Array], jax.Array],
  images: jax.Array,
  mode: InferenceMode,
) -> jax.Array:
  """`[B, H, W, K]` class scores of normalised `[B, H, W, 3]` images.

  Single scale without flip: the logits (whole or slide). Otherwise the
  mean softmax over every (scale, flip) pass, each resized back to the
  input size with bilinear interpolation.
  """
  h, w = images.shape[1:3]

  def one_pass(x):
    if mode.mode == 'slide':
      return slide_logits(apply, x, mode.crop, mode.window_stride)
    return apply(x)

  if not mode.averages_scores:
    return one_pass(images).astype(jnp.float32)
  total = 0.0
  passes = 0
  for scale in mode.scales:
    x = resize_bilinear(images, _scaled_size((h, w), scale))
    for flipped in (False, True) if mode.flip else (False,):
      xi = x[:, :, ::-1] if flipped else x
      out = one_pass(xi).astype(jnp.float32)
      out = out[:, :, ::-1] if flipped else out
      out = resize_bilinear(out, (h, w))
      total = total + jax.nn.softmax(out, axis=-1)
      passes += 1
  return total / passes


def data_source(
  meta: Mapping[str, Any],
  training: Mapping[str, Any] | None,
  *,
  dataset: str | None = None,
  split: str | None = None,
  data_dir: str | None = None,
) -> tuple[str, str, str | None]:
  """`(dataset, split, data_dir)` to evaluate a checkpoint on: the given
  values first, then the training run's config (`training`, the dict of a
  workdir's `config.json` or a recipe), then the checkpoint's metadata."""
  data = dict((training or {}).get('data') or {})
  dataset = dataset or data.get('dataset') or meta.get('dataset')
  if dataset is None:
    raise UserError('the checkpoint names no data set; pass --dataset NAME')
  same = dataset == data.get('dataset')
  split = split or (same and data.get('eval_split')) or 'validation'
  data_dir = data_dir or (same and data.get('data_dir')) or None
  return dataset, split, data_dir


def headline(summary: Mapping[str, Any]) -> dict[str, Any]:
  """The one-line JSON record of an evaluation."""
  keys = ('miou', 'pixel_accuracy', 'mean_accuracy', 'fwiou', 'num_images')
  return {k: summary[k] for k in (*keys, 'images_per_s')}


@functools.partial(nnx.jit, static_argnames=('mode', 'num_classes', 'mesh'))
def _eval_batch(model, images, labels, mask, *, mode, num_classes, mesh):
  # Every model input (image, window, scale) split as the mesh says.
  apply = lambda x: model(sharding.split_images(x, mesh))['out']
  pred = jnp.argmax(scores(apply, images, mode), axis=-1).astype(jnp.int32)
  cm = metrics.sharded_confusion_matrix(pred, labels, mask, num_classes, mesh)
  return pred, cm


def _progress(total: int, enabled: bool):
  if not enabled:
    return None
  return tqdm(total=total, desc='evaluate', unit='img', dynamic_ncols=True)


def evaluate(
  model: nnx.Module,
  meta: dict[str, Any],
  *,
  dataset: str,
  split: str,
  data_dir: str | None = None,
  mode: InferenceMode = InferenceMode(),
  batch_size: int = 1,
  max_examples: int | None = None,
  on_prediction: Callable[[str, np.ndarray], None] | None = None,
  progress: bool = False,
  devices: Sequence[jax.Device] | None = None,
  spatial: int = 1,
) -> dict[str, Any]:
  """mIoU etc. of `model` over a whole split.

  Args:
    model: a model from `checkpointing.load_model` (or `models.create`).
    meta: its checkpoint metadata (normalisation, class names).
    dataset, split, data_dir: a prepared data set (`scripts.build_dataset`).
    mode: whole / slide, scales, flip.
    batch_size: images per step on this process (rounded up to a multiple
      of the local device count).
    max_examples: evaluate only the first examples (quick checks).
    on_prediction: called as `(image_id, [H, W] train-id map)` per example.
    progress: show a progress bar with ETA.
    devices: this process's devices to use (default: all local ones).
    spatial: split each image's height over this many of them (mesh
      `(-1, spatial)`): for images too large for one device's memory. The
      numbers are those of `spatial=1` up to float rounding.

  Returns:
    `metrics.summarize`'s dict plus `confusion` (a `[K, K]` list),
    `num_images`, `images_per_s`, `mode`.
  """
  source, spec = datasets.open_split(dataset, split, data_dir)
  num_classes = meta['model']['num_classes']
  if spec.num_classes != num_classes:
    raise ConfigError(
      f'the checkpoint predicts {num_classes} classes but {dataset} has '
      f'{spec.num_classes}; evaluate on the data set it was trained for'
    )
  norm = meta['normalization']
  prepare = transforms.EvalPrepare(
    lut=spec.lut, mean=tuple(norm['mean']), std=tuple(norm['std'])
  )
  devices = list(devices or jax.local_devices())
  mesh = sharding.make_mesh((-1, spatial) if spatial > 1 else (-1,), devices)
  slots = mesh.shape[sharding.DATA_AXIS]
  batch_size = -(-batch_size // slots) * slots
  nnx.update(model, jax.device_put(nnx.state(model), sharding.replicated(mesh)))
  model = inference_view(model, platform_of(mesh))
  if spatial > 1:  # as training does on a spatial mesh (programs.training_view)
    model = nnx.view(model, conv_lowering='native')
  # Whole images on each device of a spatial group; split inside the step.
  data = jax.sharding.NamedSharding(mesh, jax.P(sharding.DATA_AXIS))

  n = len(source) if max_examples is None else min(len(source), max_examples)
  mine = list(range(jax.process_index(), n, jax.process_count()))
  total = np.zeros((num_classes, num_classes), np.int64)
  buckets: dict[tuple[int, int], list[tuple[str, dict]]] = {}
  bar = _progress(len(mine), progress and jax.process_index() == 0)
  t0 = time.perf_counter()

  new_shapes = program_memory.NewShapes()  # each new size compiles

  def run(items):
    nonlocal total
    new_shapes.before(items[0][1]['label'].shape)
    reps = batch_size - len(items)
    exs = [ex for _, ex in items] + [items[0][1]] * reps
    mask = np.zeros((batch_size, *exs[0]['label'].shape), bool)
    mask[: len(items)] = True
    arrays = [
      np.stack([ex['image'] for ex in exs]),
      np.stack([ex['label'] for ex in exs]),
      mask,
    ]
    arrays = [jax.device_put(a, data) for a in arrays]
    pred, cm = _eval_batch(
      model, *arrays, mode=mode, num_classes=num_classes, mesh=mesh
    )
    total += np.asarray(jax.device_get(cm), np.int64)
    if on_prediction is not None:
      pred = np.asarray(jax.device_get(pred))
      for i, (image_id, _) in enumerate(items):
        on_prediction(image_id, pred[i])
    if bar is not None:
      bar.update(len(items))

  for i in mine:
    raw = source[i]
    ex = prepare(raw)
    image_id = raw.get('image_id', str(i))
    if isinstance(image_id, bytes):
      image_id = image_id.decode()
    key = ex['label'].shape
    buckets.setdefault(key, []).append((image_id, ex))
    if len(buckets[key]) == batch_size:
      run(buckets.pop(key))
  for items in buckets.values():
    run(items)
  if bar is not None:
    bar.close()
  elapsed = time.perf_counter() - t0
  if jax.process_count() > 1:
    multihost.meet('evaluation done')  # hosts evaluate unequal shares
    total = np.asarray(multihost_utils.process_allgather(total)).sum(0)
  # A converted checkpoint may know no class names; the data set does.
  summary = metrics.summarize(
    total, meta.get('class_names') or spec.class_names
  )
  summary.update(
    confusion=total.tolist(),
    num_images=n,
    images_per_s=len(mine) / elapsed if elapsed else 0.0,
    mode=dataclasses.asdict(mode),
  )
  return summary


def cityscapes_label_id_writer(output_dir: str) -> Callable:
  """An `on_prediction` callback writing `<image_id>_labelIds.png` files of
  Cityscapes labelIds, the input of the official evaluation script
  (`cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py`)."""
  lut = label_tables.cityscapes_train_to_label_id()
  os.makedirs(output_dir, exist_ok=True)

  def write(image_id: str, pred: np.ndarray) -> None:
    name = os.path.join(output_dir, f'{image_id}_labelIds.png')
    Image.fromarray(lut[pred].astype(np.uint8)).save(name)

  return write


def write_results(summary: dict[str, Any], output_dir: str) -> list[str]:
  """`results.json`, `confusion.png`, `per_class.md` and TensorBoard scalars
  (`eval/miou`, `eval/iou/<class>`) in `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  paths = [
    os.path.join(output_dir, f)
    for f in ('results.json', 'confusion.png', 'per_class.md')
  ]
  with open(paths[0], 'w') as f:
    json.dump(summary, f, indent=1)
  figures.confusion_figure(
    np.asarray(summary['confusion']), list(summary['per_class_iou']), paths[1]
  )
  with open(paths[2], 'w') as f:
    f.write(metrics.format_table(summary) + '\n')
  writer = metrics_log.summary_writer(os.path.join(output_dir, 'tensorboard'))
  for key in ('miou', 'pixel_accuracy', 'mean_accuracy', 'fwiou'):
    writer.add_scalar(f'eval/{key}', summary[key], 0)
  for name, iou in summary['per_class_iou'].items():
    if iou == iou:
      writer.add_scalar(f'eval/iou/{name}', iou, 0)
  writer.close()
  return paths
