"""The code base is ruff-clean (lint and format), and keeps its rooms: the
library never imports the tests or the recipes, its import graph has no
cycle, the run loop builds no programs, scripts stay short. (The target
platform choosing the kernels is checked by compiling for a TPU:
tpu_test.py.)"""

import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  'args', [['check', '.'], ['format', '--check', '.']], ids=['lint', 'format']
)
def test_ruff(args):
  # The test extra installs ruff beside this Python, venv activated or not.
  beside = os.path.join(os.path.dirname(sys.executable), 'ruff')
  ruff = shutil.which('ruff') or (beside if os.path.exists(beside) else None)
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


def _module_name(path):
  rel = os.path.relpath(path, REPO)[: -len('.py')].replace(os.sep, '.')
  return rel[: -len('.__init__')] if rel.endswith('.__init__') else rel


def _import_graph():
  """`{module: {deeplab_jax modules it imports}}`, function-level imports
  included: `from pkg import name` is an edge to `pkg.name` when that is a
  module, else to `pkg`."""
  modules = {_module_name(p) for p in _py('deeplab_jax/**/*.py')}
  graph = {}
  for path in _py('deeplab_jax/**/*.py'):
    edges = set()
    for node in ast.walk(ast.parse(_text(path))):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        for a in node.names:
          sub = f'{node.module}.{a.name}'
          edges.add(sub if sub in modules else node.module)
    graph[_module_name(path)] = edges & modules
  return graph


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(node, trail):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return trail[trail.index(nxt) :] + [nxt]
      if nxt not in state and (found := visit(nxt, [*trail, nxt])):
        return found
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node, [node])):
      return found
  return None


def test_cycle_finder_finds_a_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert _cycle(graph) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_library_import_graph_has_no_cycle():
  assert _cycle(_import_graph()) is None


def test_library_never_imports_the_recipes():
  offenders = [
    (os.path.relpath(p, REPO), name)
    for p in _py('deeplab_jax/**/*.py')
    for name in _imports(p)
    if name == 'configs' or name.startswith('configs.')
  ]
  assert not offenders


def test_checkpointing_never_imports_what_fetches_weights():
  graph = _import_graph()
  for module, edges in graph.items():
    if module.startswith('deeplab_jax.checkpointing'):
      assert not {e for e in edges if e.startswith('deeplab_jax.convert')}


def test_the_run_loop_builds_no_programs():
  train = os.path.join(REPO, 'deeplab_jax/train.py')
  assert _lines(train) < 500
  jits = [
    node.lineno
    for node in ast.walk(ast.parse(_text(train)))
    if isinstance(node, ast.Attribute) and node.attr == 'jit'
  ]
  assert not jits, f'train.py calls jax.jit at lines {jits}: use programs'
