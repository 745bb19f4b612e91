"""What can refuse a run is said before step 1, through `scripts.train`:
one line each, nothing trained, nothing written into the workdir; and a
resumed run says where it resumes from."""

import os
import subprocess

import pytest

from tests.run_helpers import REPO, finish_all, one_error_line, train_cmd


def _start(args, env=None):
  return subprocess.Popen(
    args,
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu', **(env or {})),
  )


@pytest.mark.slow
def test_bad_settings_are_one_line_before_step_1(data_dir, tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  cases = {
    'eval_split': (
      ['--config.data.eval_split=validaton'],
      "synthetic_shapes has no split 'validaton'; it has ",
    ),
    'eval_every': (
      ['--config.eval.every_steps=0'],
      'eval.every_steps=0 must be positive (a large value makes it rare)',
    ),
    'log_every': (
      ['--config.train.log_every_steps=0'],
      'train.log_every_steps=0 must be positive',
    ),
    'conv_lowering': (
      ['--config.model.conv_lowering=natve'],
      'model.conv_lowering must be one of auto, native, im2col, taps, '
      "winograd, not 'natve'",
    ),
    'crop': (
      ['--config.mesh.shape=(2,4)', '--config.data.crop_size=(60,64)'],
      'data.crop_size height 60 gives feature maps of height 60/16',
    ),
  }
  workdirs = {name: tmp_path / name for name in cases}
  procs = [
    _start(train_cmd(str(workdirs[name]), data_dir, *flags))
    for name, (flags, _) in cases.items()
  ]
  procs.append(_start(train_cmd(str(a_file), data_dir)))
  procs.append(_start(train_cmd(str(a_file / 'run'), data_dir)))
  results = finish_all(procs)
  for (name, (_, part)), (code, _, err) in zip(
    cases.items(), results, strict=False
  ):
    line = one_error_line(code, err)
    assert part in line, (name, line)
    assert not workdirs[name].exists(), name
  line = one_error_line(*results[-2][::2])
  assert line == (
    f'error: --workdir {a_file} is a file, not a folder; pass a folder (new '
    'or one a run of this config wrote)'
  )
  line = one_error_line(*results[-1][::2])
  assert line == (
    f'error: --workdir {a_file / "run"} lies under {a_file}, which is a '
    'file; pass a folder path'
  )
  assert a_file.read_text() == 'not a folder'


@pytest.mark.slow
def test_a_resumed_run_says_where_it_resumes_from(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  flags = ['--config.checkpoint.every_steps=2', '--config.train.num_steps=2']
  [(code, _, err)] = finish_all([_start(train_cmd(workdir, data_dir, *flags))])
  assert code == 0, err[-3000:]
  assert 'resuming from' not in err
  more = ['--config.checkpoint.every_steps=2', '--config.train.num_steps=4']
  [(code, _, err)] = finish_all([_start(train_cmd(workdir, data_dir, *more))])
  assert code == 0, err[-3000:]
  ckpts = os.path.join(workdir, 'checkpoints')
  [line] = [x for x in err.splitlines() if x.startswith('resuming from')]
  assert line.startswith('resuming from step 2 (saved at 20')
  assert line.endswith(f' UTC) in {ckpts}')
