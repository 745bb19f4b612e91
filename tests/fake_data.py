"""Small generated data sets in the layouts users download."""

import io
import os
import zipfile

import numpy as np
from PIL import Image


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def cityscapes_zips(root, n_train=2, n_val=1, hw=(16, 32)):
  """`leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` as
  cityscapes-dataset.com ships them (random pixels, raw labelIds 0-33),
  in a new directory `root`."""
  os.makedirs(root)
  rng = np.random.RandomState(1)
  with (
    zipfile.ZipFile(
      os.path.join(root, 'leftImg8bit_trainvaltest.zip'), 'w'
    ) as zi,
    zipfile.ZipFile(os.path.join(root, 'gtFine_trainvaltest.zip'), 'w') as zl,
  ):
    for split, n in (('train', n_train), ('val', n_val), ('test', 1)):
      for i in range(n):
        stem = f'aachen_{i:06d}_000019'
        zi.writestr(
          f'leftImg8bit/{split}/aachen/{stem}_leftImg8bit.png',
          _png(rng.randint(0, 255, (*hw, 3))),
        )
        zl.writestr(
          f'gtFine/{split}/aachen/{stem}_gtFine_labelIds.png',
          _png(rng.randint(0, 34, hw)),
        )
