"""The code base is ruff-clean (lint and format), and keeps its rooms: the
library never imports the tests, scripts stay short. (The target platform
choosing the kernels is checked by compiling for a TPU: tpu_test.py.)"""

import ast
import glob
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  'args', [['check', '.'], ['format', '--check', '.']], ids=['lint', 'format']
)
def test_ruff(args):
  ruff = shutil.which('ruff')
  assert ruff, 'ruff is part of the test extra: pip install -e ".[test]"'
  r = subprocess.run([ruff, *args], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def _py(pattern):
  return sorted(glob.glob(os.path.join(REPO, pattern), recursive=True))


def _text(path):
  with open(path) as f:
    return f.read()


def _lines(path):
  return len(_text(path).splitlines())


def _imports(path):
  tree = ast.parse(_text(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def test_library_and_scripts_never_import_the_tests():
  offenders = [
    (os.path.relpath(p, REPO), name)
    for p in _py('deeplab_jax/**/*.py') + _py('scripts/*.py')
    for name in _imports(p)
    if name == 'tests' or name.startswith('tests.')
  ]
  assert not offenders


def test_scripts_are_short_and_layers_hold_only_layers():
  long = {
    os.path.relpath(p, REPO): n
    for p in _py('scripts/*.py')
    if (n := _lines(p)) > 125
  }
  assert not long, long
  assert _lines(os.path.join(REPO, 'deeplab_jax/models/layers.py')) < 500
