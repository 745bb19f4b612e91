"""Inference: images -> logits -> label maps and colour overlays."""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from deeplab_jax import program_memory, sharding
from deeplab_jax.data import images, normalization
from deeplab_jax.data import labels as label_tables
from deeplab_jax.errors import UserError
from deeplab_jax.models import platform_of, platform_view

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')


def inference_view(
  model: nnx.Module, platform: str | None = None
) -> nnx.Module:
  """The model with running BN statistics and dropout off (shares weights),
  its convolutions lowered for the fastest forward pass on `platform` (the
  model's own, if None) (`forward_only`: do not differentiate this view)."""
  if platform is not None:
    model = platform_view(model, platform)
  return nnx.view(
    model,
    use_running_average=True,
    deterministic=True,  # LR-ASPP has no dropout to turn off
    forward_only=True,
    raise_if_not_found=False,
  )


@functools.partial(nnx.jit, static_argnames='mesh')
def _main_logits(
  model: nnx.Module, images: jax.Array, mesh: jax.sharding.Mesh | None
) -> jax.Array:
  if mesh is not None:
    images = sharding.split_images(images, mesh)
  return model(images)['out'].astype(jnp.float32)


def _view_and_mesh(model: nnx.Module, spatial: int):
  """`(inference view, mesh or None)` for `_main_logits`. With `spatial >
  1`, the view is a copy whose weights are replicated over a `(1, spatial)`
  mesh of local devices; the caller's model stays where it is."""
  if spatial == 1:
    return inference_view(model, platform_of(jax.local_devices()[:1])), None
  mesh = sharding.make_mesh((1, spatial), jax.local_devices())
  view = inference_view(model, platform_of(mesh))
  # XLA's own convolutions partition along height (programs.training_view).
  graphdef, state = nnx.split(nnx.view(view, conv_lowering='native'))
  state = jax.device_put(state, sharding.replicated(mesh))
  return nnx.merge(graphdef, state), mesh


def _placed_images(images, mesh: jax.sharding.Mesh | None):
  """`images` as float32, checked, and replicated over `mesh` if any."""
  if not isinstance(images, jax.Array):
    # Placed, not converted with jnp.asarray (a program per shape).
    images = jax.device_put(np.asarray(images, np.float32))
  if images.ndim != 4 or images.shape[-1] != 3:
    raise UserError(
      f'images must be [B, H, W, 3], got shape {tuple(images.shape)}'
    )
  images = images.astype(jnp.float32)
  if mesh is None:
    return images
  return jax.device_put(images, sharding.replicated(mesh))


def logits(
  model: nnx.Module, images: jax.Array, *, spatial: int = 1
) -> jax.Array:
  """Main-head logits of `model` in inference mode, jitted.

  Args:
    model: a model from `models.create`, `convert.torch.load` or a
      checkpoint (training mode is fine: the inference view is taken here).
    images: `[B, H, W, 3]` float32, already normalised.
    spatial: split each image's height over this many local devices (an
      image too large for one device); the same logits up to float rounding.

  Returns:
    `[B, H, W, num_classes]` float32 logits at the input size.
  """
  view, mesh = _view_and_mesh(model, spatial)
  return _main_logits(view, _placed_images(images, mesh), mesh)


def lowered(
  model: nnx.Module, images: jax.Array, *, spatial: int = 1
) -> jax.stages.Lowered:
  """The program `logits` runs, lowered: `.compile().memory_analysis()`
  gives its per-device memory, `.compile().as_text()` its collectives."""
  view, mesh = _view_and_mesh(model, spatial)
  return _main_logits.lower(view, _placed_images(images, mesh), mesh)


def colorize(label_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """`[H, W]` class ids -> `[H, W, 3]` uint8 colours; ids past the palette
  (e.g. an ignore label) are white."""
  colors = np.full((256, 3), 255, np.uint8)
  colors[: len(palette)] = palette[:256]
  return colors[np.clip(label_map, 0, 255)]


def overlay(
  image: np.ndarray, colors: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
  """Blends a colour label map over the RGB image (same size, uint8)."""
  blend = (1 - alpha) * image.astype(np.float32) + alpha * colors
  return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


_LEGEND_ROW = 14  # pixels: a 10-pixel swatch and the default bitmap font


def legend(
  width: int, entries: Sequence[tuple[str, Sequence[int]]]
) -> np.ndarray:
  """A white `[rows * 14, width, 3]` uint8 strip of colour swatches and
  class names, wrapped to `width`, to put under an overlay."""
  from PIL import ImageDraw, ImageFont

  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  placed, x, row = [], 2, 0
  for name, colour in entries:
    w = 14 + int(measure.textlength(name, font=font)) + 10
    if x + w > width and x > 2:
      x, row = 2, row + 1
    placed.append((x, row, name, tuple(int(c) for c in colour)))
    x += w
  strip = Image.new('RGB', (width, (row + 1) * _LEGEND_ROW), 'white')
  draw = ImageDraw.Draw(strip)
  for x, row, name, colour in placed:
    y = row * _LEGEND_ROW + 2
    draw.rectangle((x, y, x + 9, y + 9), fill=colour, outline='black')
    draw.text((x + 14, y - 1), name, fill='black', font=font)
  return np.asarray(strip)


def find_images(pattern: str) -> list[str]:
  """A file, a directory (its images, sorted) or a glob -> image paths."""
  return find_inputs(pattern)[0]


def find_inputs(pattern: str) -> tuple[list[str], list[str]]:
  """`(image paths, skipped files)` of a file, a directory or a glob: in a
  directory, files without an image extension are skipped (and listed);
  two images whose outputs would share a name are refused, naming both."""
  skipped = []
  if os.path.isdir(pattern):
    paths = []
    for f in sorted(os.listdir(pattern)):
      path = os.path.join(pattern, f)
      if not os.path.isfile(path):
        continue
      (paths if f.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(path)
  elif os.path.isfile(pattern):
    paths = [pattern]
  else:
    paths = sorted(glob.glob(pattern))
  if not paths:
    raise UserError(f'no images found at {pattern!r} (file, directory or glob)')
  by_stem: dict[str, str] = {}
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in by_stem:
      raise UserError(
        f'{by_stem[stem]} and {path} would both write {stem}_label.png; '
        'rename one or predict them separately'
      )
    by_stem[stem] = path
  return paths, skipped


def read_image(path: str) -> np.ndarray:
  """RGB uint8 `[H, W, 3]` (alpha dropped, grayscale expanded, 16-bit
  refused: `data.images`); an undecodable file names itself."""
  return images.read_rgb(path)


def bucket_shape(hw: Sequence[int], bucket: int) -> tuple[int, int]:
  """`(H, W)` rounded up to multiples of `bucket` (1 = unchanged)."""
  return tuple(-(-int(d) // bucket) * bucket for d in hw)


def predict_images(
  model: nnx.Module,
  meta: Mapping[str, Any],
  paths: Sequence[str],
  *,
  batch_size: int = 4,
  bucket: int = 1,
  spatial: int = 1,
  failed: list[tuple[str, str]] | None = None,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Predicts image files in batches: yields `(path, [H, W] uint8 class
  ids, [H, W, K] float32 logits)` in the order batches complete.

  Images of the same size are batched together (partial batches are filled
  with blank images so each size compiles once); with the default
  `bucket=1` every image is predicted exactly as `logits` predicts it
  alone. `bucket > 1` is a speed option that changes the numbers: images
  are zero-padded (after normalisation, i.e. with the mean colour) at the
  bottom/right to a multiple of `bucket`, so a folder of mixed sizes
  compiles one program per bucket instead of per size, and the outputs are
  cropped back; but ASPP's image pooling and the final resize then see the
  padded image (docs/parity.md gives the measured deviation). `spatial`
  splits each image over that many devices (`logits`). With `failed` (a
  list), a file that cannot be read is appended as `(path, reason)` and
  skipped instead of stopping the rest.
  """
  norm = meta['normalization']
  view, mesh = _view_and_mesh(model, spatial)
  pending: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}

  new_shapes = program_memory.NewShapes()  # each new size compiles

  def run(hw, items):
    new_shapes.before(hw)
    x = np.zeros((batch_size, *hw, 3), np.float32)
    for i, (_, image) in enumerate(items):
      h, w = image.shape[:2]
      x[i, :h, :w] = normalization.normalize(image, norm['mean'], norm['std'])
    out = np.asarray(_main_logits(view, _placed_images(x, mesh), mesh))
    for i, (path, image) in enumerate(items):
      h, w = image.shape[:2]
      crop = out[i, :h, :w]
      yield path, crop.argmax(-1).astype(np.uint8), crop

  for path in paths:
    try:
      image = read_image(path)
    except UserError as e:
      if failed is None:
        raise
      failed.append((path, str(e)))
      continue
    hw = bucket_shape(image.shape[:2], bucket)
    pending.setdefault(hw, []).append((path, image))
    if len(pending[hw]) == batch_size:
      yield from run(hw, pending.pop(hw))
  for hw, items in pending.items():
    yield from run(hw, items)


def write_prediction(
  image_path: str,
  output_dir: str,
  label_map: np.ndarray,
  meta: Mapping[str, Any],
  *,
  logits_: np.ndarray | None = None,
  with_overlay: bool = True,
) -> list[str]:
  """Writes `<name>_label.png` (a palette PNG of class ids),
  `<name>_overlay.png` (colours over the image, and under it a legend of
  the classes it shows) and, given `logits_`,
  `<name>_logits.npy` for one predicted image."""
  palette = label_tables.default_palette(max(meta['model']['num_classes'], 1))
  stem = os.path.splitext(os.path.basename(image_path))[0]
  written = []
  label_png = Image.fromarray(label_map)  # 'L'; putpalette makes it 'P'
  label_png.putpalette(palette[:256].reshape(-1).tolist())
  path = os.path.join(output_dir, f'{stem}_label.png')
  label_png.save(path)
  written.append(path)
  if with_overlay:
    path = os.path.join(output_dir, f'{stem}_overlay.png')
    image = read_image(image_path)
    names = meta.get('class_names') or []
    present = [int(c) for c in np.unique(label_map)]
    key = legend(
      image.shape[1],
      [
        (names[c] if c < len(names) else f'class {c}', palette[c])
        for c in present
        if c < len(palette)
      ],
    )
    blended = overlay(image, colorize(label_map, palette))
    Image.fromarray(np.concatenate([blended, key])).save(path)
    written.append(path)
  if logits_ is not None:
    path = os.path.join(output_dir, f'{stem}_logits.npy')
    np.save(path, logits_)
    written.append(path)
  return written
