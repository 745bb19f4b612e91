r"""Exports a checkpoint's inference function as a serialised artifact.

  python -m scripts.export --checkpoint W/checkpoints --size 1024x2048 \
      --output exported [--batch 1] [--platforms cpu,cuda,tpu] [--saved_model]

Writes `model.jax_export` (`jax.export` for --platforms, each with its own
kernels, default this host's; symbolic batch unless --batch) and
`export.json` (the checkpoint's metadata and input size); `--saved_model`
also writes a TensorFlow SavedModel through jax2tf (needs TensorFlow).
Reload with `deeplab_jax.export.load_exported(DIR)`.
"""

from absl import flags

from deeplab_jax.cli import (
  ModelLoadFlags,
  entry_point,
  output_dir,
  parse_hw,
  run,
  use_compilation_cache,
)
from deeplab_jax.errors import UserError

_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'Checkpoint dir or a training workdir.'
)
_SIZE = flags.DEFINE_string('size', None, 'Input HxW, e.g. 512x1024.')
_BATCH = flags.DEFINE_integer('batch', None, 'Fixed batch (default: any).')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory for the artifacts.')
_PLATFORMS = flags.DEFINE_list(
  'platforms', [], 'cpu, cuda, rocm, tpu (default: this host).'
)
_SAVED_MODEL = flags.DEFINE_bool('saved_model', False, 'Also jax2tf.')
_FORCE = flags.DEFINE_bool('force', False, 'Write into a non-empty --output.')

_LOAD = ModelLoadFlags()


@entry_point
def main(argv):
  del argv
  use_compilation_cache()  # a rerun or resume loads its compiled programs
  from deeplab_jax import export

  if not (_CHECKPOINT.value and _SIZE.value and _OUTPUT.value):
    raise UserError('pass --checkpoint, --size HxW and --output')
  h, w = parse_hw(_SIZE.value, 'size')
  export.check_platforms(_PLATFORMS.value)
  if _SAVED_MODEL.value:
    export.require_tensorflow()  # before anything is loaded or written
  with output_dir(_OUTPUT.value, force=_FORCE.value) as out:
    model, meta = _LOAD.load(_CHECKPOINT.value)
    for path in export.export_dir(
      model,
      meta,
      out,
      height=h,
      width=w,
      batch=_BATCH.value,
      saved_model=_SAVED_MODEL.value,
      platforms=_PLATFORMS.value,
    ):
      print(path)
  print(
    f"exported to {out}; load it with deeplab_jax.export.load_exported('{out}')"
  )


if __name__ == '__main__':
  run(main)
