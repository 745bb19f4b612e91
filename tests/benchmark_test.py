"""The benchmark script runs for a tiny model and prints every field."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {
  'framework',
  'arch',
  'batch',
  'size',
  'dtype',
  'train_img_s',
  'eval_img_s',
  'peak_mem_mb',
  'gflops_per_img',
}
JAX_FIELDS = FIELDS | {
  'devices',
  'param_sharding',
  'compile_s',
  'train_program_mb_per_device',
  'train_tflop_s',
  'peak_tflop_s',
  'train_mfu',
}


def test_benchmark_prints_jax_and_torch_rows():
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'scripts.benchmark',
      '--arch',
      'deeplabv3_resnet_tiny',
      '--batch',
      '2',
      '--size',
      '64x64',
      '--steps',
      '1',
      '--devices',
      '1,2',
      '--param_sharding',
      'fsdp',
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [
    json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')
  ]
  assert [(r['devices'], r['param_sharding']) for r in rows] == [
    (1, 'fsdp'),
    (2, 'fsdp'),
  ]
  for row in rows:
    assert JAX_FIELDS <= set(row) and row['framework'] == 'jax'
    assert row['train_img_s'] > 0 and row['gflops_per_img'] > 0
    assert 0 < row['train_mfu'] and row['peak_source'] == 'measured matmul'
  assert rows[1]['batch'] == 4  # --batch is per device
  assert '| framework |' in r.stdout


def test_torch_reference_row_has_every_field():
  from deeplab_jax import benchmarking

  row = benchmarking.torch_model(
    'deeplabv3_resnet50', batch=2, size=(64, 64), steps=1
  )
  assert FIELDS <= set(row) and row['framework'] == 'torch'
  assert row['train_img_s'] > 0 and row['eval_img_s'] > 0
