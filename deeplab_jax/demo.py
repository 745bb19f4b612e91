"""A self-contained demo input: a tiny model checkpoint and an image drawn
like the synthetic_shapes data set's.

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
from deeplab_jax.data.builders import synthetic

DEMO_CLASSES = synthetic.CLASSES
# An example index no split of the data set uses (train 0..., validation
# 10**6...): drawn like the demo's training data, but never trained on.
_HELD_OUT = 2 * 10**6


def generated_image() -> np.ndarray:
  """An RGB uint8 image drawn as the synthetic_shapes data set draws its
  images (`configs/synthetic_demo.py` trains on them), not one of them."""
  image, _ = synthetic.render(
    _HELD_OUT, synthetic.SyntheticShapes.SEED, *synthetic.SyntheticShapes.SIZE
  )
  return image


def prepare(inputs: str, model_dir: str) -> tuple[str, str]:
  """Writes `image.png` into `inputs` (which then holds images only) and a
  tiny random-weight checkpoint into `model_dir`; returns
  `(checkpoint_dir, image_path)`."""
  os.makedirs(inputs, exist_ok=True)
  image_path = os.path.join(inputs, 'image.png')
  Image.fromarray(generated_image()).save(image_path)
  model = models.create(
    'deeplabv3_resnet_tiny', num_classes=len(DEMO_CLASSES), rngs=nnx.Rngs(0)
  )
  meta = checkpointing.model_metadata(model, class_names=DEMO_CLASSES)
  checkpointing.save_model(model_dir, model, meta)
  return model_dir, image_path
