"""Where the TPU compiler's time goes, read from libtpu's own log.

libtpu logs how long each stage of a compile takes (HLO passes, backend
passes, code generation, end to end) and, with
`TPU_VMODULE=hlo_pass_pipeline=1`, each HLO pass it runs. `enable` turns
that log on (before libtpu loads) into files of a log directory
(`TPU_LOG_DIR`), so the process's standard error stays as it is (a crash
during a compile stays visible); `capture` collects what the log gained
around a compile and `parse` reads it: one entry per compiled module, in
compile order.
"""

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

LOG_ENV = {
  'TPU_MIN_LOG_LEVEL': '0',
  'TPU_VMODULE': 'hlo_pass_pipeline=1',
}
# libtpu's INFO log in its log directory (a link to the newest file).
INFO_LOG = 'tpu_driver.INFO'
STAGES = ('HLO_PASSES', 'BACKEND_PASSES', 'CODE_GENERATION', 'END_TO_END')

_MODULE = re.compile(
  r'XLA::TPU running hlo passes for ([\d,]+) instructions, module: (\S+)'
)
# A duration as libtpu writes it: `139.2ms`, `5 us`, `2.78s`, `9m53.1s`.
_DURATION = r'((?:[\d.]+\s*(?:ns|us|ms|min|h|m|s)\s*)+)'
_PART = re.compile(r'([\d.]+)\s*(ns|us|ms|min|h|m|s)')
_STAGE = re.compile(r'\] (\w+) stage duration: ' + _DURATION)
_PASS = re.compile(r'\] HLO pass: (\S+) time: ' + _DURATION)
_SECONDS = {
  'ns': 1e-9,
  'us': 1e-6,
  'ms': 1e-3,
  's': 1.0,
  'm': 60.0,
  'min': 60.0,
  'h': 3600.0,
}


def enable(log_dir: str | None = None) -> str:
  """Asks libtpu to log its stages and passes into `log_dir` (a new
  temporary directory by default); returns it. libtpu reads these
  variables when it loads (the first TPU topology or client), so call
  this before."""
  log_dir = log_dir or tempfile.mkdtemp(prefix='libtpu_log_')
  os.environ.update(LOG_ENV, TPU_LOG_DIR=log_dir)
  return log_dir


def _log_text() -> str:
  path = os.path.join(os.environ.get('TPU_LOG_DIR', ''), INFO_LOG)
  try:
    with open(path, errors='replace') as f:
      return f.read()
  except OSError:
    return ''


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
  """Collects what libtpu's log (`enable`) gained while the block runs.
  Yields a list that holds the text once the block ends; standard error
  is left alone."""
  before = len(_log_text())
  text: list[str] = []
  try:
    yield text
  finally:
    text.append(_log_text()[before:])


def seconds(duration: str) -> float:
  """A duration as libtpu writes it (`139.2ms`, `5 us`, `9m53.1s`), in
  seconds."""
  return sum(float(v) * _SECONDS[u] for v, u in _PART.findall(duration))


def parse(log: str, top: int = 20) -> list[dict[str, Any]]:
  """Per compiled module, in compile order: `module` (its name),
  `instructions` (before optimisation), `stages` (seconds of each of
  `STAGES` that the log reports) and `passes` (the `top` slowest HLO
  passes: name -> seconds, summed over the pass's runs)."""
  modules: list[dict[str, Any]] = []
  for line in log.splitlines():
    if m := _MODULE.search(line):
      modules.append(
        {
          'module': m[2],
          'instructions': int(m[1].replace(',', '')),
          'stages': {},
          'passes': {},
        }
      )
    elif not modules:
      continue
    elif m := _STAGE.search(line):
      if m[1] in STAGES:
        modules[-1]['stages'][m[1]] = seconds(m[2])
    elif m := _PASS.search(line):
      passes = modules[-1]['passes']
      passes[m[1]] = passes.get(m[1], 0.0) + seconds(m[2])
  for m in modules:
    slowest = sorted(m['passes'].items(), key=lambda kv: -kv[1])[:top]
    m['passes'] = dict(slowest)
  return modules


def table(modules: list[dict[str, Any]], top: int = 8) -> str:
  """The stages of each module, then the `top` slowest HLO passes of the
  first (the train step), as Markdown."""
  lines = [
    '| module | instructions | HLO passes s | backend passes s | code '
    'generation s | end to end s |',
    '|---|---|---|---|---|---|',
  ]
  for m in modules:
    s = [m['stages'].get(k) for k in STAGES]
    cells = ' | '.join('-' if v is None else f'{v:.1f}' for v in s)
    lines.append(f'| {m["module"]} | {m["instructions"]} | {cells} |')
  if modules and modules[0]['passes']:
    first = modules[0]
    lines += [
      '',
      f'Slowest HLO passes of {first["module"]}:',
      '',
      '| HLO pass | s |',
      '|---|---|',
    ]
    lines += [
      f'| {name} | {s:.1f} |' for name, s in list(first['passes'].items())[:top]
    ]
  return '\n'.join(lines)
