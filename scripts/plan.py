r"""Plans a recipe on a TPU slice ahead of time, from any host (no TPU).

  python -m scripts.plan --config configs/cityscapes_denseaspp.py \
      --topology v5e:2x4 [--topology v6e:2x4 ...] [--output plan.jsonl]

Compiles the training and evaluation programs that `scripts.train` runs
for each topology through libtpu (`pip install -e ".[tpu]"`) and prints,
per chip: memory against HBM and whether it fits, the largest global batch
that fits (found by compiling), FLOPs and bytes per step, a roofline step
time and the MFU ceiling it implies, and the collectives of a step
(docs/tpu.md). `--compile_profile` adds where the TPU compiler's time
goes, from libtpu's log. `--config.KEY=VALUE` overrides work as in
scripts.train.
"""

import os

from absl import flags
from ml_collections import config_flags

from deeplab_jax.cli import entry_point, run

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Recipe file, e.g. configs/cityscapes_denseaspp.py.'
)
_TOPOLOGY = flags.DEFINE_multi_string(
  'topology', ['v5e:2x4'], 'TPU GENERATION:SHAPE, e.g. v5e:2x4, v6e:2x4.'
)
_LARGEST = flags.DEFINE_bool(
  'largest_batch',
  False,
  'Also find the largest batch that fits: up to --max_compiles more train '
  'steps compiled (about an hour for the main job on 2 cores).',
)
_MAX_COMPILES = flags.DEFINE_integer(
  'max_compiles', 4, 'Compiles allowed for the largest-batch search.'
)
_NUM_CLASSES = flags.DEFINE_integer(
  'num_classes', None, "Classes (default: the recipe's data set's)."
)
_BREAKDOWN = flags.DEFINE_bool(
  'breakdown', False, "Also print where each train step's bytes go."
)
_HLO_DIR = flags.DEFINE_string(
  'hlo_dir', None, "Also write each compiled train step's HLO text here."
)
_COMPILE_PROFILE = flags.DEFINE_bool(
  'compile_profile',
  False,
  "Also print the TPU compiler's time by stage and its slowest passes.",
)
_OUTPUT = flags.DEFINE_string('output', None, 'Also write JSON lines here.')


@entry_point
def main(argv):
  del argv
  import contextlib
  import json

  from deeplab_jax.data import datasets
  from deeplab_jax.errors import UserError
  from deeplab_jax.planning import compile_profile, planner, tables

  if _COMPILE_PROFILE.value:
    compile_profile.enable()

  if _CONFIG.value is None:
    raise UserError('pass --config, e.g. configs/cityscapes_denseaspp.py')
  config = _CONFIG.value
  classes = (
    _NUM_CLASSES.value or datasets.label_spec(config.data.dataset).num_classes
  )
  rows = []
  for topology in _TOPOLOGY.value:
    profile = (
      compile_profile.capture()
      if _COMPILE_PROFILE.value
      else contextlib.nullcontext()
    )
    with profile as log:
      row = planner.plan(
        config,
        topology,
        classes,
        find_largest=_LARGEST.value,
        max_compiles=_MAX_COMPILES.value,
        hlo_dir=_HLO_DIR.value,
      )
    if log:
      row['compile_profile'] = compile_profile.parse(log[0])
    rows.append(row)
    print(json.dumps(row), flush=True)
    if _OUTPUT.value:  # kept even if a later topology's compile fails
      with open(_OUTPUT.value, 'a') as f:
        f.write(json.dumps(row) + '\n')
  print(tables.table(rows))
  if _BREAKDOWN.value:
    for r in rows:
      print('\n' + tables.traffic_table(r))
  for r in rows:
    if r.get('compile_profile'):
      print(f'\nCompiling for {r["topology"]}:\n')
      print(compile_profile.table(r['compile_profile']))


if __name__ == '__main__':
  # Compile-only: the programs are built for the topology's TPU devices;
  # the process itself runs on the CPU (libtpu stays unattached).
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  run(main)
