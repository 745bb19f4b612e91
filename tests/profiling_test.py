"""`train.profile_steps`: a run traces exactly the chosen steps into its
workdir and logs their times beside the plan's estimate of the program."""

import json
import os
import subprocess

import pytest

from deeplab_jax import profiling
from deeplab_jax.errors import ConfigError
from tests.run_helpers import train_cmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_steps_are_parsed_or_refused():
  assert profiling.parse_steps('') == []
  assert profiling.parse_steps('5') == [5]
  assert profiling.parse_steps('5-7') == [5, 6, 7]
  assert profiling.parse_steps('6,5,7') == [5, 6, 7]
  for bad in ('0', '5-3', '5,7', 'x', '5-'):
    with pytest.raises(ConfigError, match='train.profile_steps'):
      profiling.parse_steps(bad)


@pytest.mark.slow
def test_training_traces_exactly_the_chosen_steps(tmp_path):
  workdir = tmp_path / 'run'
  # A plan row of this run's program (the smoke demo on the 8 CPU devices
  # the tests simulate), as `scripts.plan --output` writes it, with a
  # hand-written estimate; and a row of another batch, which must not match.
  smoke = {
    'arch': 'deeplabv3plus_resnet_tiny',
    'dtype': 'float32',
    'crop': [64, 64],
    'remat': 'none',
    'chips': 8,
  }
  plan = tmp_path / 'plan.jsonl'
  plan.write_text(
    json.dumps(dict(smoke, batch=8, step_ms=12.5, hbm_step_ms=3.25))
    + '\n'
    + json.dumps(dict(smoke, batch=16, step_ms=99.0))
    + '\n'
  )
  r = subprocess.run(
    train_cmd(
      workdir,
      None,
      '--config.train.num_steps=6',
      '--config.train.profile_steps=3-4',
      f'--config.train.profile_plan={plan}',
    ),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  events = profiling.read_trace(str(workdir / profiling.PROFILE_DIR))
  steps = sorted(
    int(e['args']['step_num'])
    for e in events
    if e.get('name') == profiling.STEP_EVENT and e.get('ph') == 'X'
  )
  assert steps == [3, 4]
  # TensorBoard's profile plugin reads the XSpace beside the trace.
  xplanes = [
    f
    for _, _, files in os.walk(workdir / 'profile')
    for f in files
    if f.endswith('.xplane.pb')
  ]
  assert xplanes
  records = [
    json.loads(line)
    for line in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  profiled = [rec for rec in records if 'profiled_steps' in rec]
  assert len(profiled) == 1 and profiled[0]['step'] == 4
  rec = profiled[0]
  assert rec['profiled_steps'] == 2
  assert rec['planned_xla_step_ms'] == 12.5
  assert rec['planned_hbm_step_ms'] == 3.25
  assert 0 < rec['profile_device_ms'] and 0 < rec['profile_wall_ms']
  assert 'profiled step 3-4:' in r.stderr and 'planned: 12.5 ms' in r.stderr
