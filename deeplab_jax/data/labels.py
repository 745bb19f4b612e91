"""Class tables: names, raw-id -> train-id lookup tables, palettes.

Raw label maps are stored as the data sets ship them; the input pipeline maps
them to train ids with a 256-entry lookup table, `IGNORE` (255) for pixels
that count in no class.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = 255


def default_palette(num_classes: int) -> np.ndarray:
  """`[num_classes, 3]` uint8 colours, Pascal VOC's bit-interleaved scheme.

  Class 0 is black, then distinct saturated colours; the first 21 are the
  VOC colours.
  """
  palette = np.zeros((num_classes, 3), np.uint8)
  for c in range(num_classes):
    label, r, g, b = c, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((label >> 0) & 1) << shift
      g |= ((label >> 1) & 1) << shift
      b |= ((label >> 2) & 1) << shift
      label >>= 3
    palette[c] = (r, g, b)
  return palette


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """How a data set's raw label maps become train ids.

  Attributes:
    class_names: train-id order.
    lut: `[256]` uint8, raw value -> train id or `IGNORE`.
    palette: `[num_classes, 3]` uint8 display colours.
    valid_raw: raw values that may appear in a label map; anything else is
      reported with its file when the data set is built.
  """

  class_names: tuple[str, ...]
  lut: np.ndarray
  palette: np.ndarray
  valid_raw: frozenset[int]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def identity_spec(
  class_names: tuple[str, ...], extra_valid: tuple[int, ...] = (IGNORE,)
) -> LabelSpec:
  """Raw value k is class k; `extra_valid` values (e.g. 255) are ignored."""
  k = len(class_names)
  lut = np.full(256, IGNORE, np.uint8)
  lut[:k] = np.arange(k)
  return LabelSpec(
    class_names, lut, default_palette(k), frozenset(range(k)) | set(extra_valid)
  )


# Cityscapes: (labelId, name, trainId, colour) for the 19 evaluated classes;
# every other labelId (0-6, 9, 10, 14-16, 18, 29, 30) is ignored. From the
# official cityscapesScripts `helpers/labels.py`.
CITYSCAPES_CLASSES = (
  (7, 'road', (128, 64, 128)),
  (8, 'sidewalk', (244, 35, 232)),
  (11, 'building', (70, 70, 70)),
  (12, 'wall', (102, 102, 156)),
  (13, 'fence', (190, 153, 153)),
  (17, 'pole', (153, 153, 153)),
  (19, 'traffic light', (250, 170, 30)),
  (20, 'traffic sign', (220, 220, 0)),
  (21, 'vegetation', (107, 142, 35)),
  (22, 'terrain', (152, 251, 152)),
  (23, 'sky', (70, 130, 180)),
  (24, 'person', (220, 20, 60)),
  (25, 'rider', (255, 0, 0)),
  (26, 'car', (0, 0, 142)),
  (27, 'truck', (0, 0, 70)),
  (28, 'bus', (0, 60, 100)),
  (31, 'train', (0, 80, 100)),
  (32, 'motorcycle', (0, 0, 230)),
  (33, 'bicycle', (119, 11, 32)),
)
CITYSCAPES_NUM_LABEL_IDS = 34  # labelIds 0..33


def cityscapes_spec() -> LabelSpec:
  """The 19 Cityscapes train ids from raw labelIds."""
  lut = np.full(256, IGNORE, np.uint8)
  for train_id, (label_id, _, _) in enumerate(CITYSCAPES_CLASSES):
    lut[label_id] = train_id
  return LabelSpec(
    tuple(name for _, name, _ in CITYSCAPES_CLASSES),
    lut,
    np.array([c for _, _, c in CITYSCAPES_CLASSES], np.uint8),
    frozenset(range(CITYSCAPES_NUM_LABEL_IDS)),
  )


def cityscapes_train_to_label_id() -> np.ndarray:
  """`[256]` train id -> labelId, for the official evaluation script."""
  out = np.zeros(256, np.uint8)
  for train_id, (label_id, _, _) in enumerate(CITYSCAPES_CLASSES):
    out[train_id] = label_id
  return out


# ADE20K SceneParse150 (ADEChallengeData2016), classes 1..150 in order; raw 0
# is "other" and ignored.
ADE20K_CLASSES = (
  'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed',
  'windowpane', 'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door',
  'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
  'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
  'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp',
  'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
  'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace',
  'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
  'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
  'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill',
  'bench', 'countertop', 'stove', 'palm', 'kitchen island', 'computer',
  'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel',
  'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
  'television receiver', 'airplane', 'dirt track', 'apparel', 'pole',
  'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
  'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer',
  'plaything', 'swimming pool', 'stool', 'barrel', 'basket', 'waterfall',
  'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step',
  'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
  'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase',
  'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate',
  'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock',
  'flag',
)  # fmt: skip


def ade20k_spec() -> LabelSpec:
  """150 classes; raw k in 1..150 -> k - 1, raw 0 -> ignore."""
  lut = np.full(256, IGNORE, np.uint8)
  lut[1:151] = np.arange(150)
  return LabelSpec(
    ADE20K_CLASSES, lut, default_palette(151)[1:], frozenset(range(151))
  )


VOC_CLASSES = (
  'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus',
  'car', 'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike',
  'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor',
)  # fmt: skip


def voc_spec() -> LabelSpec:
  """21 classes; 255 (object boundaries) ignored."""
  return identity_spec(VOC_CLASSES)
