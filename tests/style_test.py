"""The code base is ruff-clean (lint and format), as part of the suite."""

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
