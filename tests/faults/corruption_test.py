"""Damaged checkpoints: detected, reported, skipped; or a clear stop.

Orbax stores no checksums (a flipped byte restores silently wrong) and has
no fallback; every case here must resume from the newest good step and end
bitwise equal to the undamaged run, or stop with a message and change
nothing.
"""

import glob
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import assert_bitwise_equal, config, weights

from deeplab_jax import checkpointing, train
from deeplab_jax.checkpointing import train_checkpointer
from deeplab_jax.errors import CheckpointCorruptError, CheckpointReadError

OVERRIDES = {'train.num_steps': 6, 'checkpoint.every_steps': 2}


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  """A finished 6-step run (checkpoints 4 and 6) and its final weights."""
  workdir = str(tmp_path_factory.mktemp('ref') / 'run')
  train.train_and_evaluate(config(data_dir, **OVERRIDES), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
    '4',
    '6',
  ]
  return workdir, weights(workdir)


def _array_file(step_dir, rng):
  """The array data file of the model or the train item (seeded choice):
  the largest file of the item's OCDBT store (small ones hold its index)."""
  item = rng.choice(['model', 'train'])
  files = glob.glob(os.path.join(step_dir, item, 'ocdbt.process_0', 'd', '*'))
  return max(files, key=os.path.getsize)


def flip_byte(step_dir, rng):
  """One flipped bit in the middle half of the array bytes: Orbax restores
  this silently wrong."""
  path = _array_file(step_dir, rng)
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  n = len(data)
  data[rng.randint(n // 4, 3 * n // 4)] ^= 1 << rng.randint(8)
  with open(path, 'wb') as f:
    f.write(bytes(data))


def truncate(step_dir, rng):
  path = _array_file(step_dir, rng)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def delete_file(step_dir, rng):
  os.remove(_array_file(step_dir, rng))


def edit_data_state(step_dir, rng):
  """Valid JSON with another input position: restores without error."""
  del rng
  path = os.path.join(step_dir, 'data', 'metadata')
  text = open(path).read()
  assert '"global_next_index": 48' in text
  with open(path, 'w') as f:
    f.write(text.replace('"global_next_index": 48', '"global_next_index": 40'))


def delete_digests(step_dir, rng):
  """No digests item: the step cannot be verified, so it is not used."""
  del rng
  shutil.rmtree(os.path.join(step_dir, 'digests'))


DAMAGES = [flip_byte, truncate, delete_file, edit_data_state, delete_digests]
# Orbax leaves a read coroutine unfinished when a damaged array fails to
# load; Python reports it as unraisable when it is collected.
# Several processes and injected faults: the slow tier.
pytestmark = [
  pytest.mark.slow,
  pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
]


@pytest.mark.parametrize('damage', DAMAGES, ids=lambda d: d.__name__)
def test_damaged_latest_step_falls_back(damage, reference, data_dir, tmp_path):
  ref_dir, ref_weights = reference
  rng = np.random.RandomState(hash(damage.__name__) % 2**31)
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir)
  damage(os.path.join(workdir, 'checkpoints', '6'), rng)
  summary = train.train_and_evaluate(config(data_dir, **OVERRIDES), workdir)
  assert summary['step'] == 6
  ckpts = os.path.join(workdir, 'checkpoints')
  # The damaged step is kept for inspection, not deleted or reused.
  assert os.listdir(os.path.join(ckpts, 'corrupt')) == ['6']
  assert {'4', '6'} <= set(os.listdir(ckpts))
  assert_bitwise_equal(weights(workdir), ref_weights)


def test_no_good_step_stops_and_changes_nothing(reference, data_dir, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir)
  rng = np.random.RandomState(0)
  ckpts = os.path.join(workdir, 'checkpoints')
  flip_byte(os.path.join(ckpts, '6'), rng)
  delete_file(os.path.join(ckpts, '4'), rng)
  before = sorted(os.listdir(ckpts))
  with pytest.raises(CheckpointCorruptError) as e:
    train.train_and_evaluate(config(data_dir, **OVERRIDES), workdir)
  msg = str(e.value)
  assert 'step 6: CheckpointCorruptError' in msg and 'step 4:' in msg
  assert 'new --workdir' in msg and '\n' not in msg
  assert sorted(os.listdir(ckpts)) == before


def test_loading_a_damaged_step_names_it(reference, tmp_path):
  """What evaluate / predict / export / init_from load is verified too."""
  ref_dir, ref_weights = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir)
  step6 = os.path.join(workdir, 'checkpoints', '6')
  # One flipped bit in the model item (what load_model reads).
  path = max(
    glob.glob(os.path.join(step6, 'model', 'ocdbt.process_0', 'd', '*')),
    key=os.path.getsize,
  )
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 4
  open(path, 'wb').write(bytes(data))
  with pytest.raises(CheckpointCorruptError) as e:
    checkpointing.load_model(workdir)
  assert f'{step6}: item model, array [' in str(e.value)
  assert 'does not match its digest' in str(e.value)

  shutil.rmtree(workdir)
  shutil.copytree(ref_dir, workdir)
  delete_digests(step6, None)
  with pytest.raises(CheckpointCorruptError, match='--allow_unverified'):
    checkpointing.load_model(workdir)
  assert_bitwise_equal(weights(workdir, allow_unverified=True), ref_weights)


def _failing_restore(monkeypatch, times):
  """Orbax's restore raises a storage error `times` times (None: always)."""
  original = ocp.CheckpointManager.restore
  calls = []

  def restore(self, *args, **kwargs):
    calls.append(args[0] if args else kwargs.get('step'))
    if times is None or len(calls) <= times:
      raise OSError(104, 'Connection reset by storage (injected)')
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)
  monkeypatch.setattr(train_checkpointer, 'RESTORE_BACKOFF_S', 0.01)
  return calls


def test_a_storage_error_on_restore_is_retried(
  reference, data_dir, tmp_path, monkeypatch
):
  """One OSError while reading the newest step: tried again, and the run
  resumes from that step; nothing is moved aside."""
  ref_dir, ref_weights = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir)
  calls = _failing_restore(monkeypatch, times=1)
  summary = train.train_and_evaluate(config(data_dir, **OVERRIDES), workdir)
  assert summary['step'] == 6
  assert calls[:2] == [6, 6]  # the newest step, tried twice
  ckpts = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckpts)) == ['4', '6']
  assert_bitwise_equal(weights(workdir), ref_weights)


def test_a_storage_error_that_persists_stops_with_every_step_in_place(
  reference, data_dir, tmp_path, monkeypatch
):
  ref_dir, _ = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir)
  ckpts = os.path.join(workdir, 'checkpoints')
  before = sorted(os.listdir(ckpts))
  calls = _failing_restore(monkeypatch, times=None)
  with pytest.raises(CheckpointReadError) as e:
    train.train_and_evaluate(config(data_dir, **OVERRIDES), workdir)
  assert calls == [6] * train_checkpointer.RESTORE_TRIES  # never an older step
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'could not read checkpoint step 6 in {ckpts} (')
  assert 'Connection reset by storage (injected)' in message
  assert 'every step was left in place' in message
  assert sorted(os.listdir(ckpts)) == before
  assert 'corrupt' not in before
