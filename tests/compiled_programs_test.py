"""Why a pytest worker died inside XLA:CPU's compiler, and what prevents it
(tests/compiled_programs.py, docs/testing.md).

The cause, reproduced in its exact condition: a process holding as many
memory maps as the kernel allows compiles a program, and XLA:CPU's code
loader fails and the process dies with SIGSEGV under
`backend_compile_and_load`. The prevention, through pytest as the suite
runs it: the programs a test module compiled are released when it ends."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.run_helpers import REPO

AT_THE_LIMIT = """
import jax, jax.numpy as jnp
from deeplab_jax.program_memory import map_limit, memory_maps
from tests.compiled_programs import fill_memory_maps

x = jnp.ones((16, 16))
jax.jit(lambda a: a + 1)(x).block_until_ready()  # the runtime's own maps
fill_memory_maps(leave=2)
print('maps', memory_maps(), 'limit', map_limit(), flush=True)
kept = []
for i in range(20):
  f = jax.jit(lambda a, i=i: jnp.tanh(a * (i + 1.5)) @ a + i)
  kept.append(f.lower(x).compile())
print('compiled them all', flush=True)
"""


def test_a_process_out_of_memory_maps_dies_compiling():
  r = subprocess.run(
    [sys.executable, '-X', 'faulthandler', '-c', AT_THE_LIMIT],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert 'maps' in r.stdout, r.stderr[-3000:]
  assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr[-3000:])
  assert 'LLVM compilation error: Cannot allocate memory' in r.stderr
  assert 'in backend_compile_and_load' in r.stderr
  assert 'compiled them all' not in r.stdout


MODULE_THAT_COMPILES = """
import jax, jax.numpy as jnp
from deeplab_jax.program_memory import memory_maps

FNS = [jax.jit(lambda a, i=i: jnp.tanh(a * (i + 1.5)) @ a + i)
       for i in range(50)]  # live for the whole run, as a module's are


def test_compiles_programs():
  before = memory_maps()
  for f in FNS:
    f(jnp.ones((16, 16))).block_until_ready()
  grown = memory_maps() - before
  assert grown >= 100, grown
  with open({record!r}, 'w') as out:
    out.write(str(memory_maps()))
"""

MODULE_AFTER_IT = """
from deeplab_jax.program_memory import memory_maps


def test_the_programs_maps_are_gone():
  with open({record!r}) as f:
    left_by_the_module_before = int(f.read())
  assert memory_maps() <= left_by_the_module_before - 100
"""


def test_a_finished_module_releases_its_programs_maps(tmp_path):
  suite = tmp_path / 'suite'
  suite.mkdir()
  record = str(tmp_path / 'maps')
  for name, text in (
    ('a_compiles_test.py', MODULE_THAT_COMPILES),
    ('b_after_test.py', MODULE_AFTER_IT),
  ):
    (suite / name).write_text(textwrap.dedent(text.format(record=record)))
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'pytest',
      '-p',
      'tests.conftest',  # the suite's own fixtures
      '-p',
      'no:xdist',
      '-p',
      'no:cacheprovider',
      '-c',
      os.path.join(REPO, 'pyproject.toml'),
      '--rootdir',
      str(suite),
      str(suite),
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert '2 passed' in r.stdout.strip().splitlines()[-1], r.stdout[-3000:]


PREDICT_NEAR_THE_LIMIT = """
import os, sys
import numpy as np
from flax import nnx
from PIL import Image
from deeplab_jax import checkpointing, models, predict
from deeplab_jax.program_memory import memory_maps
from tests.compiled_programs import fill_memory_maps

folder = sys.argv[1]
rng = np.random.RandomState(0)
paths = []
for k in range(8):  # 8 sizes: 8 programs
  path = os.path.join(folder, f'{{k}}.png')
  Image.fromarray(rng.randint(0, 255, (40 + 8 * k, 56, 3), np.uint8)).save(path)
  paths.append(path)
model = models.create({name!r}, num_classes=3, rngs=nnx.Rngs(0))
meta = checkpointing.model_metadata(model, class_names=('x', 'y', 'z'))
before = memory_maps()
next(predict.predict_images(model, meta, paths[:1], batch_size=1))
per_program = memory_maps() - before
fill_memory_maps(leave=3 * per_program)  # room for 3 programs, not 8
done = sum(1 for _ in predict.predict_images(model, meta, paths, batch_size=1))
print('predicted', done, 'maps per program', per_program, flush=True)
"""


@pytest.mark.slow
def test_prediction_over_many_sizes_near_the_limit_finishes(tmp_path):
  """More image sizes than programs fit in the maps left: prediction drops
  cached programs as it goes (`program_memory.make_room`) and finishes."""
  script = PREDICT_NEAR_THE_LIMIT.format(name='deeplabv3plus_resnet_tiny')
  _finishes_all_8_sizes(script, str(tmp_path))


def _finishes_all_8_sizes(script: str, folder: str) -> None:
  """Runs `script FOLDER` on one CPU device: it must finish its 8 sizes
  (`predicted 8 ...` / `evaluated 8 ...`), each program taking maps."""
  r = subprocess.run(
    [sys.executable, '-X', 'faulthandler', '-c', script, folder],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
  assert r.stdout.split()[1] == '8', r.stdout
  assert int(r.stdout.split()[-1]) > 100, r.stdout  # programs do take maps


EVALUATE_NEAR_THE_LIMIT = """
import sys
from flax import nnx
from deeplab_jax import checkpointing, evaluate, models
from deeplab_jax.program_memory import memory_maps
from tests.compiled_programs import fill_memory_maps

model = models.create('deeplabv3_resnet_tiny', num_classes=3, rngs=nnx.Rngs(0))
meta = checkpointing.model_metadata(
  model, class_names=('a', 'b', 'c'), extra={'dataset': 'image_folder'})
common = dict(dataset='image_folder', split='validation',
              data_dir=sys.argv[1], batch_size=1, progress=False)
before = memory_maps()
evaluate.evaluate(model, meta, max_examples=1, **common)
per_program = memory_maps() - before
fill_memory_maps(leave=3 * per_program)  # room for 3 programs, not 8
summary = evaluate.evaluate(model, meta, **common)
print('evaluated', summary['num_images'], 'maps per program', per_program)
"""


@pytest.mark.slow
def test_evaluation_over_many_sizes_near_the_limit_finishes(tmp_path):
  """As prediction: a validation split of more sizes than programs fit in
  the maps left is evaluated to the end."""
  from PIL import Image

  from deeplab_jax.data import datasets

  root = tmp_path / 'folder'
  root.mkdir()
  (root / 'classes.txt').write_text('a\nb\nc')
  rng = np.random.RandomState(0)
  for split in ('train', 'validation'):
    (root / split / 'images').mkdir(parents=True)
    (root / split / 'masks').mkdir(parents=True)
    for k in range(8):  # 8 sizes: 8 programs
      hw = (40 + 8 * k, 56)
      Image.fromarray(rng.randint(0, 255, (*hw, 3), np.uint8)).save(
        root / split / 'images' / f'{k}.png'
      )
      Image.fromarray(rng.randint(0, 3, hw, np.uint8)).save(
        root / split / 'masks' / f'{k}.png'
      )
  data_dir = str(tmp_path / 'tfds')
  datasets.prepare('image_folder', data_dir=data_dir, manual_dir=str(root))
  _finishes_all_8_sizes(EVALUATE_NEAR_THE_LIMIT, data_dir)
