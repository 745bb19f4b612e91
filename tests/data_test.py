"""Builders from tiny generated files; pipeline determinism and resumption."""

import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from deeplab_jax.data import datasets, pipeline
from deeplab_jax.data.builders import base
from deeplab_jax.data.labels import IGNORE, cityscapes_spec
from tests.fake_data import cityscapes_zips


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def _jpeg(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='JPEG')
  return buf.getvalue()


@pytest.fixture(scope='module')
def synthetic_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  datasets.prepare('synthetic_shapes', data_dir=d)
  return d


def test_synthetic_builder(synthetic_dir):
  src, spec = datasets.open_split('synthetic_shapes', 'train', synthetic_dir)
  assert len(src) == 320 and spec.num_classes == 4
  ex = src[5]
  assert ex['image'].shape == (96, 128, 3) and ex['image'].dtype == np.uint8
  assert ex['label'].shape == (96, 128, 1)
  assert set(np.unique(ex['label'])) <= {0, 1, 2, 3}
  val, _ = datasets.open_split('synthetic_shapes', 'validation', synthetic_dir)
  assert len(val) == 64
  # Deterministic: the generator reproduces the stored example (TFDS stores
  # examples in hashed-key order, so look it up by id).
  from deeplab_jax.data.builders import synthetic

  ids = [src[i]['image_id'] for i in range(len(src))]
  ex = src[ids.index(b'train_00005')]
  image, label = synthetic.render(5, synthetic.SyntheticShapes.SEED, 96, 128)
  np.testing.assert_array_equal(ex['label'][..., 0], label)
  np.testing.assert_array_equal(ex['image'], image)


def _cfg(data_dir, **kw):
  args = dict(
    dataset='synthetic_shapes',
    data_dir=data_dir,
    global_batch_size=4,
    crop_size=(32, 40),
    seed=3,
  )
  args.update(kw)
  return pipeline.TrainInputConfig(**args)


def test_train_pipeline_shapes_determinism_and_resume(synthetic_dir):
  ds, _ = pipeline.train_dataset(_cfg(synthetic_dir))
  it = iter(ds)
  first = [next(it) for _ in range(3)]
  b = first[0]
  # uint8 batches: the train step normalises on the device.
  assert b['image'].shape == (4, 32, 40, 3) and b['image'].dtype == np.uint8
  assert b['label'].shape == (4, 32, 40) and b['label'].dtype == np.uint8
  # Same seed -> same batches.
  again = iter(pipeline.train_dataset(_cfg(synthetic_dir))[0])
  for x in first:
    y = next(again)
    np.testing.assert_array_equal(x['image'], y['image'])
  # Resume: starting at step k gives exactly the following batches.
  expected = [next(it) for _ in range(3)]
  fresh = iter(pipeline.train_dataset(_cfg(synthetic_dir), start_step=3)[0])
  for x in expected:
    y = next(fresh)
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  other = iter(pipeline.train_dataset(_cfg(synthetic_dir, seed=4))[0])
  assert not np.array_equal(next(other)['image'], first[0]['image'])


def test_two_hosts_get_disjoint_shards_that_cover_the_split(synthetic_dir):
  seen = []
  for host in range(2):
    batches = pipeline.eval_batches(
      'synthetic_shapes',
      'validation',
      data_dir=synthetic_dir,
      global_batch_size=10,
      process_index=host,
      process_count=2,
    )
    n = 0
    for batch in batches:
      assert batch['image'].shape[0] == 5  # per-host batch
      n += int(batch['mask'].any(axis=(1, 2)).sum())
    seen.append(n)
  assert seen == [32, 32]
  # Training shards: disjoint halves of the split.
  import tensorflow_datasets as tfds

  halves = [
    tfds.split_for_jax_process('train', process_index=i, process_count=2)
    for i in range(2)
  ]
  b = datasets.builder('synthetic_shapes', synthetic_dir)
  ids = [
    {b.as_data_source(split=h)[j]['image_id'] for j in range(160)}
    for h in halves
  ]
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 320


def test_eval_covers_every_example_once_with_padding(synthetic_dir):
  total, pixels = 0, 0
  for batch in pipeline.eval_batches(
    'synthetic_shapes',
    'validation',
    data_dir=synthetic_dir,
    global_batch_size=24,
    process_index=0,
    process_count=1,
  ):
    assert batch['image'].shape == (24, 96, 128, 3)
    real = batch['mask'].any(axis=(1, 2))
    total += int(real.sum())
    pixels += int(batch['mask'].sum())
    assert (batch['label'][~real] == IGNORE).all()
  assert total == 64 and pixels == 64 * 96 * 128  # 3 batches, last padded


def _image_folder(root, *, bad_label=False, corrupt=False):
  os.makedirs(root)
  with open(os.path.join(root, 'classes.txt'), 'w') as f:
    f.write('sky\nroad\ncar\n')
  rng = np.random.RandomState(0)
  for split, n in (('train', 3), ('validation', 2)):
    os.makedirs(os.path.join(root, split, 'images'))
    os.makedirs(os.path.join(root, split, 'masks'))
    for i in range(n):
      h, w = 20 + i, 30
      img = rng.randint(0, 255, (h, w, 3))
      with open(os.path.join(root, split, 'images', f'{i}.jpg'), 'wb') as f:
        f.write(_jpeg(img) if not (corrupt and i == 1) else b'not an image')
      mask = rng.randint(0, 3, (h, w))
      mask[0, 0] = 255
      if bad_label and i == 2:
        mask[1, 1] = 9
      with open(os.path.join(root, split, 'masks', f'{i}.png'), 'wb') as f:
        f.write(_png(mask))


def test_image_folder_builder_and_errors(tmp_path):
  root = str(tmp_path / 'mydata')
  _image_folder(root)
  data_dir = str(tmp_path / 'tfds')
  datasets.prepare('image_folder', data_dir=data_dir, manual_dir=root)
  src, spec = datasets.open_split('image_folder', 'validation', data_dir)
  assert spec.class_names == ('sky', 'road', 'car') and len(src) == 2
  ex = {src[i]['image_id']: src[i] for i in range(len(src))}[b'validation/1']
  assert ex['image'].shape == (21, 30, 3)
  assert ex['label'][0, 0, 0] == 255

  bad = str(tmp_path / 'bad')
  _image_folder(bad, bad_label=True)
  with pytest.raises(
    base.DataError,
    match=r'train/masks/2\.png has label '
    r'values \[9\]',
  ):
    datasets.prepare(
      'image_folder', data_dir=str(tmp_path / 't2'), manual_dir=bad
    )
  corrupt = str(tmp_path / 'corrupt')
  _image_folder(corrupt, corrupt=True)
  with pytest.raises(base.DataError, match=r'cannot decode .*images/1\.jpg'):
    datasets.prepare(
      'image_folder', data_dir=str(tmp_path / 't3'), manual_dir=corrupt
    )


def test_image_folder_takes_rgba_and_gray_and_refuses_16_bit(tmp_path):
  """RGBA: alpha dropped; grayscale: expanded to RGB (as PIL converts
  them); a 16-bit image is refused in one line naming it, not clipped."""
  import subprocess
  import sys

  root = tmp_path / 'raw'
  (root / 'train' / 'images').mkdir(parents=True)
  (root / 'train' / 'masks').mkdir(parents=True)
  (root / 'classes.txt').write_text('a\nb\n')
  rng = np.random.RandomState(7)
  arrays = {
    'rgba': rng.randint(0, 256, (12, 17, 4)).astype(np.uint8),
    'gray': rng.randint(0, 256, (12, 17)).astype(np.uint8),
  }
  for name, array in arrays.items():
    Image.fromarray(array).save(root / 'train' / 'images' / f'{name}.png')
    Image.fromarray(rng.randint(0, 2, (12, 17)).astype(np.uint8)).save(
      root / 'train' / 'masks' / f'{name}.png'
    )
  data_dir = str(tmp_path / 'tfds')
  datasets.prepare('image_folder', data_dir=data_dir, manual_dir=str(root))
  src, _ = datasets.open_split('image_folder', 'train', data_dir)
  got = {src[i]['image_id'].decode(): src[i]['image'] for i in range(len(src))}
  np.testing.assert_array_equal(got['train/rgba'], arrays['rgba'][..., :3])
  np.testing.assert_array_equal(
    got['train/gray'], np.repeat(arrays['gray'][..., None], 3, -1)
  )

  deep = root / 'train' / 'images' / 'deep.png'
  Image.fromarray(rng.randint(0, 65535, (12, 17)).astype(np.uint16)).save(deep)
  Image.fromarray(np.zeros((12, 17), np.uint8)).save(
    root / 'train' / 'masks' / 'deep.png'
  )
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'scripts.build_dataset',
      '--dataset',
      'image_folder',
      '--manual_dir',
      str(root),
      '--data_dir',
      str(tmp_path / 'tfds2'),
    ],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  error = [x for x in r.stderr.splitlines() if x.startswith('error: ')]
  assert len(error) == 1 and f'{deep} has I;16 pixels' in error[0]


def test_cityscapes_builder_maps_label_ids_to_train_ids(tmp_path):
  root = str(tmp_path / 'manual')
  cityscapes_zips(root)
  data_dir = str(tmp_path / 'tfds')
  datasets.prepare('cityscapes', data_dir=data_dir, manual_dir=root)
  src, spec = datasets.open_split('cityscapes', 'train', data_dir)
  assert len(src) == 2 and spec.num_classes == 19
  raw = src[0]['label'][..., 0]
  mapped = spec.lut[raw]
  lut = cityscapes_spec().lut
  assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18 and lut[0] == 255
  np.testing.assert_array_equal(mapped, lut[raw])
  batch = next(
    pipeline.eval_batches(
      'cityscapes',
      'validation',
      data_dir=data_dir,
      global_batch_size=2,
      process_index=0,
      process_count=1,
    )
  )
  assert set(np.unique(batch['label'])) <= set(range(19)) | {255}


def test_missing_files_and_unprepared_data_name_the_fix(tmp_path):
  with pytest.raises(
    datasets.DatasetNotFoundError,
    match='gtFine_trainvaltest.zip.*cityscapes-dataset',
  ):
    os.makedirs(tmp_path / 'empty')
    datasets.prepare(
      'cityscapes',
      data_dir=str(tmp_path / 'd'),
      manual_dir=str(tmp_path / 'empty'),
    )
  with pytest.raises(
    datasets.DatasetNotFoundError,
    match='scripts.build_dataset --dataset ade20k .* --manual_dir DIR '
    r'\(DIR holding ADEChallengeData2016.zip from http',
  ):
    datasets.open_split('ade20k', 'train', str(tmp_path / 'd'))
  with pytest.raises(Exception, match='unknown dataset'):
    datasets.spec('kitti')


def test_ade20k_builder(tmp_path):
  root = tmp_path / 'manual'
  root.mkdir()
  rng = np.random.RandomState(2)
  with zipfile.ZipFile(root / 'ADEChallengeData2016.zip', 'w') as z:
    for split, n in (('training', 2), ('validation', 1)):
      for i in range(n):
        stem = f'ADE_{split[:5]}_{i:08d}'
        z.writestr(
          f'ADEChallengeData2016/images/{split}/{stem}.jpg',
          _jpeg(rng.randint(0, 255, (12, 20, 3))),
        )
        z.writestr(
          f'ADEChallengeData2016/annotations/{split}/{stem}.png',
          _png(rng.randint(0, 151, (12, 20))),
        )
  data_dir = str(tmp_path / 'tfds')
  datasets.prepare('ade20k', data_dir=data_dir, manual_dir=str(root))
  src, spec = datasets.open_split('ade20k', 'train', data_dir)
  assert len(src) == 2 and spec.num_classes == 150
  assert spec.lut[0] == 255 and spec.lut[1] == 0 and spec.lut[150] == 149


def _add(tar, name, data):
  import tarfile

  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_voc_aug_builder_merges_sbd_and_voc(tmp_path):
  import tarfile

  from scipy import io as sio

  root = tmp_path / 'manual'
  root.mkdir()
  rng = np.random.RandomState(4)
  voc_ids = {'train': ['a', 'b'], 'val': ['c']}
  with tarfile.open(root / 'VOCtrainval_11-May-2012.tar', 'w') as t:
    base_dir = 'VOCdevkit/VOC2012/'
    for split, ids in voc_ids.items():
      _add(
        t,
        f'{base_dir}ImageSets/Segmentation/{split}.txt',
        '\n'.join(ids).encode(),
      )
    for i in ['a', 'b', 'c', 'd', 'e']:
      _add(
        t,
        f'{base_dir}JPEGImages/{i}.jpg',
        _jpeg(rng.randint(0, 255, (10, 14, 3))),
      )
    # VOC ships palette PNGs whose pixel values are class ids and whose
    # palette maps them to colours; here every colour differs from its
    # index, so a decoder that reads colours instead of indices fails.
    palette = rng.randint(0, 256, (256, 3)).astype(np.uint8)
    palette[:, 0] = (np.arange(256) + 7) % 256
    voc_labels = {}
    for i in ['a', 'b', 'c']:
      label = rng.randint(0, 21, (10, 14)).astype(np.uint8)
      label[0] = 255  # boundary pixels
      voc_labels[i] = label
      im = Image.fromarray(label, mode='L').convert('P')
      im.putpalette(palette.reshape(-1).tolist())
      buf = io.BytesIO()
      im.save(buf, format='PNG')
      with Image.open(io.BytesIO(buf.getvalue())) as check:
        assert check.mode == 'P'
        assert (np.asarray(check.convert('L')) != label).any()
      _add(t, f'{base_dir}SegmentationClass/{i}.png', buf.getvalue())
  with tarfile.open(root / 'benchmark.tgz', 'w:gz') as t:
    sbd = 'benchmark_RELEASE/dataset/'
    _add(t, f'{sbd}train.txt', b'd\na\n')
    _add(t, f'{sbd}val.txt', b'e\nc\n')  # c is VOC val: left out of train
    for i in ['a', 'c', 'd', 'e']:
      buf = io.BytesIO()
      sio.savemat(
        buf,
        {
          'GTcls': {
            'Segmentation': rng.randint(0, 21, (10, 14)).astype(np.uint8)
          }
        },
      )
      _add(t, f'{sbd}cls/{i}.mat', buf.getvalue())
  data_dir = str(tmp_path / 'tfds')
  datasets.prepare('voc_aug', data_dir=data_dir, manual_dir=str(root))
  train_src, spec = datasets.open_split('voc_aug', 'train', data_dir)
  val_src, _ = datasets.open_split('voc_aug', 'validation', data_dir)
  train_ids = sorted(train_src[i]['image_id'] for i in range(len(train_src)))
  assert train_ids == [b'a', b'b', b'd', b'e'] and len(val_src) == 1
  assert spec.num_classes == 21
  ex = {train_src[i]['image_id']: train_src[i] for i in range(len(train_src))}
  # The VOC PNG wins over SBD, decoded as indices.
  for i in (b'a', b'b'):
    np.testing.assert_array_equal(
      ex[i]['label'][..., 0], voc_labels[i.decode()]
    )
  assert ex[b'd']['label'].max() <= 20
