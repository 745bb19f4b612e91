"""A run's metrics log: metrics.jsonl and TensorBoard events, written
without loading PyTorch into the training process."""

import glob
import importlib.util
import json
import os

import pytest

from tests.run_helpers import run_python

LOG_ONE_STEP = """
import sys
from deeplab_jax.run_dir import metrics_log
with metrics_log.MetricsLog({workdir!r}, True) as log:
  log.write(3, {{'loss': 0.5, 'iou': {{'road': 0.25}}}})
print('torch' in sys.modules)
import torch  # installed, and not kept out for later imports
print(torch.__name__)
"""


@pytest.mark.skipif(
  importlib.util.find_spec('torch') is None, reason='needs torch installed'
)
def test_metrics_go_to_jsonl_and_tensorboard_without_loading_torch(tmp_path):
  # tensorboardX imports torch whenever it is installed, as the test extra
  # installs it: the log hides torch for that import.
  r = run_python(['-c', LOG_ONE_STEP.format(workdir=str(tmp_path))])
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ['False', 'torch']
  with open(tmp_path / 'metrics.jsonl') as f:
    assert json.loads(f.read()) == {
      'step': 3,
      'loss': 0.5,
      'iou': {'road': 0.25},
    }
  [events] = glob.glob(os.path.join(tmp_path, 'tb', 'events.out.tfevents.*'))
  with open(events, 'rb') as f:
    data = f.read()
  # The two scalars' tags, as TensorBoard reads them.
  assert b'loss' in data and b'iou/road' in data
