"""Pascal VOC 2012 with the SBD augmentation (Hariharan et al. 2011).

The 10,582-image `train` split of the DeepLab papers: SBD train + SBD val +
VOC train, minus VOC val; `validation` is VOC 2012 val (1,449). Manual-dir
files: `VOCtrainval_11-May-2012.tar` (host.robots.ox.ac.uk/pascal/VOC/
voc2012/) and SBD's `benchmark.tgz` (www.eecs.berkeley.edu/Research/Projects/
CS/vision/grouping/semantic_contours/). A VOC PNG label (255 on object
boundaries, ignored) is used where it exists, SBD's `cls/*.mat` otherwise.
TFDS's `voc` builder downloads at prepare time and has no SBD, hence ours.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds

from deeplab_jax.data.builders import base
from deeplab_jax.data.labels import voc_spec

VOC_TAR = 'VOCtrainval_11-May-2012.tar'
SBD_TGZ = 'benchmark.tgz'
_VOC = 'VOCdevkit/VOC2012/'
_SBD = 'benchmark_RELEASE/dataset/'


def _ids(data: bytes) -> list[str]:
  return [line.strip() for line in data.decode().splitlines() if line.strip()]


def _sbd_label_png(mat_bytes: bytes, name: str) -> bytes:
  from scipy import io as sio

  try:
    mat = sio.loadmat(
      io.BytesIO(mat_bytes), squeeze_me=True, struct_as_record=False
    )
    seg = np.asarray(mat['GTcls'].Segmentation, np.uint8)
  except Exception as e:  # scipy raises several types for broken files
    raise base.DataError(f'cannot read SBD label {name}: {e}') from e
  return base.png_bytes(seg)


class VocAug(base.SegmentationBuilder):
  """Pascal VOC 2012 + SBD: 21 classes, train_aug (10,582) / val (1,449)."""

  VERSION = tfds.core.Version('1.0.0')
  IMAGE_FORMAT = 'jpeg'
  LABEL_SPEC = voc_spec()
  MANUAL_FILES = (VOC_TAR, SBD_TGZ)
  SOURCE_URL = (
    'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and '
    'http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/'
    'semantic_contours/'
  )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    with tarfile.open(os.path.join(root, VOC_TAR)) as voc:
      seg_sets = _VOC + 'ImageSets/Segmentation/'
      voc_train = _ids(voc.extractfile(seg_sets + 'train.txt').read())
      voc_val = _ids(voc.extractfile(seg_sets + 'val.txt').read())
    sbd_labels, sbd_ids = {}, set()
    with tarfile.open(os.path.join(root, SBD_TGZ)) as sbd:
      for member in sbd:  # one pass over the compressed archive
        name = member.name
        if name in (_SBD + 'train.txt', _SBD + 'val.txt'):
          sbd_ids.update(_ids(sbd.extractfile(member).read()))
        elif name.startswith(_SBD + 'cls/') and name.endswith('.mat'):
          stem = os.path.basename(name)[:-4]
          sbd_labels[stem] = _sbd_label_png(
            sbd.extractfile(member).read(), f'{SBD_TGZ}:{name}'
          )
    val = set(voc_val)
    train = sorted((sbd_ids | set(voc_train)) - val)
    return {
      'train': self._generate_examples(root, train, sbd_labels),
      'validation': self._generate_examples(root, sorted(val), {}),
    }

  def _generate_examples(self, root, ids, sbd_labels):
    with tarfile.open(os.path.join(root, VOC_TAR)) as voc:
      names = set(voc.getnames())
      for image_id in ids:
        image_name = f'{_VOC}JPEGImages/{image_id}.jpg'
        label_name = f'{_VOC}SegmentationClass/{image_id}.png'
        if image_name not in names:
          raise base.DataError(f'{VOC_TAR} has no {image_name}')
        if label_name in names:
          label = voc.extractfile(label_name).read()
          where = f'{VOC_TAR}:{label_name}'
        elif image_id in sbd_labels:
          label = sbd_labels[image_id]
          where = f'{SBD_TGZ}:{_SBD}cls/{image_id}.mat'
        else:
          raise base.DataError(f'no label for {image_id} in VOC or SBD')
        yield self.example(
          image_id,
          voc.extractfile(image_name).read(),
          label,
          image_name=f'{VOC_TAR}:{image_name}',
          label_name=where,
        )
