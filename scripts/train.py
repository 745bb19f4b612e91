r"""Trains a segmentation model.

  python -m scripts.train --config configs/cityscapes_denseaspp.py \
      --workdir runs/denseaspp161 [--config.train.batch_size=16 ...]

The recipe is an ml_collections config (`configs/NAME.py[:variant]`); any
key can be overridden with `--config.KEY=VALUE`. Re-running the same command
resumes from the workdir's latest checkpoint. On a cluster, launch one
process per host (see docs/distributed.md); `jax.distributed` is
initialised when several processes are detected or the coordinator flags
are given.
"""

import os
import shutil
import sys

from absl import flags
from ml_collections import config_flags

from deeplab_jax.cli import entry_point, run, use_compilation_cache

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Recipe file, e.g. configs/synthetic_demo.py[:smoke].',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (multi-host only).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')


@entry_point
def main(argv):
  del argv
  use_compilation_cache()  # a rerun or resume loads its compiled programs
  import jax

  from deeplab_jax import multihost

  multihost.initialize(
    _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  from deeplab_jax import checkpointing, train
  from deeplab_jax.convert import sources
  from deeplab_jax.data import datasets

  config = _CONFIG.value
  # Before anything is generated or fetched (train checks it again).
  sources.check_arch(config.model.init_from, config.model.arch)
  if config.data.dataset == 'synthetic_shapes':
    # Generated, not downloaded: process 0 prepares it on first use.
    def prepare():
      b = datasets.builder('synthetic_shapes', config.data.data_dir)
      if not b.is_prepared():
        datasets.prepare('synthetic_shapes', data_dir=config.data.data_dir)

    multihost.decide('synthetic_shapes prepared', prepare)
  try:
    summary = train.train_and_evaluate(config, _WORKDIR.value)
  except train.Preempted as e:
    multihost.finished()
    print(str(e))
    sys.exit(130 if e.interrupted else 0)
  multihost.finished()
  if jax.process_index() == 0:
    workdir = checkpointing.resolve_path(_WORKDIR.value)
    print(
      f'done: step {summary["step"]}, mIoU {100 * summary["miou"]:.2f}\n'
      f'the run is in {workdir}: checkpoints/, metrics.jsonl, '
      f'{_tensorboard(os.path.join(workdir, "tb"))}\n'
      f'next: python -m scripts.evaluate --checkpoint {workdir} --output '
      f'{os.path.join(workdir, "eval")}'
    )


def _tensorboard(logdir: str) -> str:
  """The command that shows the run's curves (installing TensorBoard
  first where it is not installed)."""
  show = f'tensorboard --logdir {logdir}'
  return (
    show
    if shutil.which('tensorboard')
    else f'pip install tensorboard && {show}'
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  run(main)
