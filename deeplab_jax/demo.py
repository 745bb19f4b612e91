"""A self-contained demo input: a tiny model checkpoint and a generated image.

Used by `scripts.predict --demo` to check an installation end to end with no
download: model construction, an Orbax checkpoint round trip, jitted
inference and the PNG writers.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx
from PIL import Image

from deeplab_jax import checkpointing, models

DEMO_CLASSES = ('background', 'disc', 'square')


def generated_image(height: int = 97, width: int = 129) -> np.ndarray:
  """An RGB uint8 image of a disc and a square on a gradient."""
  yy, xx = np.mgrid[:height, :width]
  img = np.stack(
    [xx * 255 // width, yy * 255 // height, np.full_like(xx, 96)], -1
  ).astype(np.uint8)
  disc = (yy - height / 3) ** 2 + (xx - width / 3) ** 2 < (height / 5) ** 2
  img[disc] = (230, 40, 40)
  img[height // 2 : height - 8, width // 2 : width - 10] = (40, 200, 60)
  return img


def prepare(directory: str) -> tuple[str, str]:
  """Writes `image.png` and a tiny random-weight checkpoint into
  `directory`; returns `(checkpoint_dir, image_path)`."""
  os.makedirs(directory, exist_ok=True)
  image_path = os.path.join(directory, 'image.png')
  Image.fromarray(generated_image()).save(image_path)
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=len(DEMO_CLASSES), rngs=nnx.Rngs(0)
  )
  ckpt = os.path.join(directory, 'checkpoint')
  meta = checkpointing.model_metadata(model, class_names=DEMO_CLASSES)
  checkpointing.save_model(ckpt, model, meta)
  return ckpt, image_path
