"""What the entry scripts keep off stderr (`deeplab_jax.cli`)."""

import json
import logging
import os
import subprocess
import sys
import threading
import types

import pytest

from deeplab_jax import cli
from tests.run_helpers import train_cmd


def _report(hook, value):
  """Calls `hook` as the interpreter would for an unraisable `value`."""
  hook(
    types.SimpleNamespace(
      exc_type=type(value),
      exc_value=value,
      exc_traceback=None,
      err_msg=None,
      object=None,
    )
  )


def test_closed_loop_reports_dropped_only_from_other_threads():
  seen = []
  hook = cli._without_closed_loop_reports(lambda u: seen.append(u.exc_value))
  closed = RuntimeError('Event loop is closed')
  other = RuntimeError('something else')
  worker = threading.Thread(
    target=lambda: [_report(hook, closed), _report(hook, other)]
  )
  worker.start()
  worker.join()
  assert seen == [other]
  _report(hook, closed)  # the main thread's own loop: still reported
  assert seen == [other, closed]


def test_orbax_and_asyncio_records_hidden_ours_kept():
  def record(name, path):
    return logging.LogRecord(name, logging.ERROR, path, 1, 'msg', None, None)

  orbax = os.path.join('site-packages', 'orbax', 'checkpoint', 'future.py')
  ours = os.path.join('deeplab_jax', 'train.py')
  assert not cli._worth_showing(record('absl', orbax))
  assert not cli._worth_showing(record('asyncio', 'base_events.py'))
  assert cli._worth_showing(record('absl', ours))
  tfds = os.path.join('site-packages', 'tensorflow_datasets', 'file_utils.py')
  assert cli._worth_showing(record('absl', tfds))
  unprepared = record('absl', tfds)
  unprepared.msg = 'Variant folder /d/x/1.0.0 has no dataset_info.json'
  assert not cli._worth_showing(unprepared)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (
  'train',
  'evaluate',
  'predict',
  'convert_torch',
  'build_dataset',
  'export',
  'benchmark',
  'plan',
)


def _run(*args):
  return subprocess.run(
    [sys.executable, '-m', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )


def _one_error_line(r):
  assert r.returncode == 1, r.stderr
  assert 'Traceback' not in r.stderr
  [line] = r.stderr.strip().splitlines()
  assert line.startswith('error: ')
  return line


def test_help_exits_zero_on_every_script():
  procs = {
    s: subprocess.Popen(
      [sys.executable, '-m', f'scripts.{s}', '--help'],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for s in SCRIPTS
  }
  for name, p in procs.items():
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, (name, err[-2000:])
    assert 'flags' in out.lower(), name


def test_flag_and_config_mistakes_are_one_line(tmp_path):
  w = str(tmp_path / 'w')
  line = _one_error_line(
    _run('scripts.train', '--config', 'configs/nope.py', '--workdir', w)
  )
  assert line.startswith('error: --config: configs/nope.py does not exist; ')
  # A mistyped recipe: the nearest name first, then every recipe.
  line = _one_error_line(
    _run(
      'scripts.train',
      '--config',
      'configs/cityscapes_densaspp.py',
      '--workdir',
      w,
    )
  )
  assert line.startswith(
    'error: --config: configs/cityscapes_densaspp.py does not exist; did you '
    'mean configs/cityscapes_denseaspp.py? The recipes: '
    'configs/cityscapes_denseaspp.py, '
  )
  listed = line.split('The recipes: ')[1].split(', ')
  recipes = sorted(
    f'configs/{f}'
    for f in os.listdir(os.path.join(REPO, 'configs'))
    if f.endswith('.py') and f not in ('__init__.py', 'base.py')
  )
  assert sorted(listed) == recipes
  line = _one_error_line(
    _run(
      'scripts.train',
      '--config',
      'configs/synthetic_demo.py',
      '--workdir',
      w,
      '--config.train.batch_sise=4',
    )
  )
  assert "no config key 'batch_sise'; did you mean 'batch_size'?" in line
  line = _one_error_line(_run('scripts.train', '--workdir', w))
  assert '--config' in line
  line = _one_error_line(
    _run(
      'scripts.train',
      '--config',
      'configs/cityscapes_mobilenet.py:smok',
      '--workdir',
      w,
    )
  )
  assert line == (
    'error: flag --config=configs/cityscapes_mobilenet.py:smok: unknown '
    "variant 'smok'; known: smoke (see --help)"
  )
  assert not os.path.exists(w)


def test_broken_state_dict_and_failed_command_leave_nothing(tmp_path):
  """A truncated .pth is one line naming it; the failed command leaves no
  --output behind, so the retry is not refused."""
  pth = tmp_path / 'model.pth'
  pth.write_bytes(b'PK\x03\x04 truncated')
  out = tmp_path / 'ckpt'
  line = _one_error_line(
    _run(
      'scripts.convert_torch',
      '--arch',
      'deeplabv3_resnet50',
      '--input',
      str(pth),
      '--output',
      str(out),
    )
  )
  assert line.startswith(f'error: cannot read {pth} as a PyTorch state dict')
  assert not out.exists()
  # A text file: our advice, never PyTorch's (weights_only=False would run
  # the file's code).
  pth.write_text('not a checkpoint\n')
  args = ['--arch', 'deeplabv3_resnet50', '--input', str(pth)]
  line = _one_error_line(
    _run('scripts.convert_torch', *args, '--output', str(out))
  )
  assert 'weights_only' not in line
  assert line.endswith(
    'torch.save(model.state_dict(), path) and pass that file'
  )
  assert not out.exists()
  # export checks its optional dependency before writing anything.
  line = _one_error_line(
    _run(
      'scripts.export',
      '--checkpoint',
      str(tmp_path / 'missing'),
      '--size',
      '64x64',
      '--output',
      str(out),
      '--saved_model',
    )
  )
  assert 'a SavedModel needs TensorFlow' in line
  assert not out.exists()


def test_recipe_path_runs_from_any_directory(tmp_path, data_dir):
  """`--config configs/NAME.py:variant` outside the clone: the installed
  recipe; a file of that path in the current directory still wins."""
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  w = tmp_path / 'w'
  args = [
    sys.executable,
    '-m',
    'scripts.train',
    '--config',
    'configs/synthetic_demo.py:smoke',
    f'--workdir={w}',
    f'--config.data.data_dir={data_dir}',
    '--config.train.num_steps=1',
    '--config.eval.every_steps=1',
    '--config.checkpoint.every_steps=1',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run(
    args, cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env
  )
  assert r.returncode == 0, r.stderr[-3000:]
  record = json.loads((w / 'config.json').read_text())
  assert record['model']['arch'] == 'deeplabv3plus_resnet_tiny'
  assert record['train']['num_steps'] == 1

  # A recipe file of the user's own at that relative path is the one read.
  own = elsewhere / 'configs'
  own.mkdir()
  (own / 'synthetic_demo.py').write_text(
    'def get_config(arg=None):\n  raise ValueError("the user file")\n'
  )
  r = subprocess.run(
    args, cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env
  )
  assert r.returncode == 1 and 'the user file' in r.stderr, r.stderr


_LIBTPU_LINES = ('E0000', 'TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE')


@pytest.mark.slow
def test_no_libtpu_start_up_lines_on_a_host_without_a_tpu(tmp_path):
  """With libtpu installed (the test extra) and no TPU, JAX's platform
  discovery loads libtpu, which prints five lines, one of them an error;
  deeplab_jax keeps it quiet for every command, training included."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(('JAX_PLATFORMS', 'TPU_'))
  }
  discover = ['-c', 'import jax; jax.devices()']
  plain = subprocess.run(
    [sys.executable, *discover], capture_output=True, text=True, env=env
  )
  assert any(line in plain.stderr for line in _LIBTPU_LINES), plain.stderr
  r = subprocess.run(
    train_cmd(tmp_path / 'run', None, '--config.train.num_steps=1'),
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert not any(line in r.stderr for line in _LIBTPU_LINES), r.stderr
