"""`compile_profile` reads libtpu's log lines as libtpu writes them (the
real log of a compile is read in `tpu_test.py`)."""

import subprocess
import sys

import pytest

from deeplab_jax.planning import compile_profile


@pytest.mark.parametrize(
  'text, want',
  [
    ('139.27456ms', 0.13927456),
    ('5 us', 5e-6),
    ('2.780618198s', 2.780618198),
    ('9m53.1s', 593.1),
    ('1h2m3s', 3723.0),
    ('1.5 min', 90.0),
  ],
)
def test_durations_in_every_unit(text, want):
  assert compile_profile.seconds(text) == pytest.approx(want)


def test_stages_and_passes_per_module():
  log = '\n'.join(
    [
      'I1206 09:54:27.550586 1 x.cc:1] XLA::TPU running hlo passes for '
      '44,555 instructions, module: jit_train_step',
      'I1206 09:54:27.6 1 p.cc:176] HLO pass: dce time: 14 us (14 us) '
      '(cumulative: 32 us, max: 14 us, #called: 3)',
      'I1206 09:54:27.7 1 p.cc:176] HLO pass: layout-assignment time: '
      '10.5 s (10.5 s) (cumulative: 11 s, max: 10.5 s, #called: 4)',
      'I1206 09:54:27.8 1 p.cc:176] HLO pass: dce time: 6 us (20 us) '
      '(cumulative: 11 s, max: 10.5 s, #called: 5)',
      'I1206 09:54:30.3 1 h.cc:6241] HLO_PASSES stage duration: 46.0s',
      'I1206 09:54:42.6 2 b.cc:3931] BACKEND_PASSES stage duration: 8m20.25s',
      'I1206 09:54:43.6 2 c.cc:1488] CODE_GENERATION stage duration: 41.9s',
      'I1206 09:54:43.8 1 e.cc:985] END_TO_END stage duration: 9m53.1s',
      'I1206 09:54:44.1 1 x.cc:1] XLA::TPU running hlo passes for 770 '
      'instructions, module: jit_eval_step',
      'I1206 09:54:44.2 1 h.cc:6241] HLO_PASSES stage duration: 139.2ms',
    ]
  )
  train, evaluation = compile_profile.parse(log)
  assert train['module'] == 'jit_train_step'
  assert train['instructions'] == 44555
  assert train['stages'] == pytest.approx(
    {
      'HLO_PASSES': 46.0,
      'BACKEND_PASSES': 500.25,
      'CODE_GENERATION': 41.9,
      'END_TO_END': 593.1,
    }
  )
  assert list(train['passes']) == ['layout-assignment', 'dce']
  assert train['passes']['dce'] == pytest.approx(20e-6)
  assert evaluation['stages'] == pytest.approx({'HLO_PASSES': 0.1392})
  table = compile_profile.table([train, evaluation])
  assert '| jit_train_step | 44555 | 46.0 | 500.2 | 41.9 | 593.1 |' in table
  assert '| jit_eval_step | 770 | 0.1 | - | - | - |' in table


def test_a_crash_during_a_profiled_compile_stays_visible(tmp_path):
  """libtpu logs into files of its log directory, so a process that dies
  inside `capture` (a compile that crashes) still shows what it wrote to
  standard error."""
  script = (
    'import os\n'
    'from deeplab_jax.planning import compile_profile\n'
    f'compile_profile.enable({str(tmp_path)!r})\n'
    'with compile_profile.capture():\n'
    "  os.write(2, b'Check failed: the compiler died here\\n')\n"
    '  os._exit(3)\n'
  )
  r = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, timeout=60
  )
  assert r.returncode == 3
  assert 'Check failed: the compiler died here' in r.stderr
