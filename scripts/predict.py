r"""Predicts label maps and colour overlays for images.

  python -m scripts.predict --checkpoint ckpt/deeplabv3_r50 \
      --input 'photos/*.jpg' --output predictions
  # A published model by name (fetched once into torch.hub's cache):
  python -m scripts.predict --checkpoint torchvision:deeplabv3_resnet101 \
      --input 'photos/*.jpg' --output predictions

  # No checkpoint at hand: a tiny random model on a generated image, which
  # checks the install end to end (model, checkpoint, inference, PNGs).
  python -m scripts.predict --demo --output demo_out
"""

import os
import sys

from absl import flags

from deeplab_jax import predict
from deeplab_jax.cli import (
  ModelLoadFlags,
  entry_point,
  output_dir,
  run,
  use_compilation_cache,
)
from deeplab_jax.errors import UserError

_CHECKPOINT = flags.DEFINE_string(
  'checkpoint',
  None,
  'Checkpoint dir (scripts.train / scripts.convert_torch), a training '
  'workdir, or a published whole model, e.g. torchvision:deeplabv3_resnet101.',
)
_INPUT = flags.DEFINE_string('input', None, 'Image file, directory or glob.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory for the outputs.')
_OVERLAY = flags.DEFINE_bool('overlay', True, 'Write colour overlays too.')
_SAVE_LOGITS = flags.DEFINE_bool('save_logits', False, 'Write logits .npy.')
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Images per batch.')
_BUCKET = flags.DEFINE_integer(
  'bucket',
  1,
  'Speed option that CHANGES THE NUMBERS: pad each image up to a multiple '
  'of this so mixed sizes share compiled programs (ASPP pooling and the '
  'final resize then see the padding). 1 (default) = exact, one compile '
  'per image size.',
)
_SPATIAL = flags.DEFINE_integer('spatial', 1, 'Devices sharing an image.')
_FORCE = flags.DEFINE_bool('force', False, 'Write into a non-empty --output.')
_DEMO = flags.DEFINE_bool(
  'demo', False, 'Use a tiny random model and a generated image.'
)

_LOAD = ModelLoadFlags()


@entry_point
def main(argv):
  del argv
  use_compilation_cache()  # a rerun or resume loads its compiled programs
  from deeplab_jax import demo

  if _OUTPUT.value is None:
    raise UserError('--output is required')
  if not _DEMO.value and (_CHECKPOINT.value is None or _INPUT.value is None):
    raise UserError('pass --checkpoint and --input (or --demo)')
  with output_dir(_OUTPUT.value, force=_FORCE.value) as out:
    checkpoint, pattern = _CHECKPOINT.value, _INPUT.value
    if _DEMO.value:
      checkpoint, pattern = demo.prepare(
        os.path.join(out, 'demo_inputs'), os.path.join(out, 'demo_model')
      )
    paths, skipped = predict.find_inputs(pattern)
    if skipped:
      names = ', '.join(os.path.basename(p) for p in skipped[:3])
      more = ', ...' if len(skipped) > 3 else ''
      print(f'skipped {len(skipped)} files that are not images ({names}{more})')
    model, meta = _LOAD.load(checkpoint)
    failed = []
    for path, label_map, logits in predict.predict_images(
      model,
      meta,
      paths,
      batch_size=_BATCH.value,
      bucket=_BUCKET.value,
      spatial=_SPATIAL.value,
      failed=failed,
    ):
      for written in predict.write_prediction(
        path,
        out,
        label_map,
        meta,
        logits_=logits if _SAVE_LOGITS.value else None,
        with_overlay=_OVERLAY.value,
      ):
        print(written)
  print(f'predicted {len(paths) - len(failed)} images; outputs in {out}')
  if failed:  # after the good images' outputs are kept
    for _, reason in failed:
      print(f'failed: {reason}', file=sys.stderr)
    raise UserError(
      f'{len(failed)} of {len(paths)} files could not be read (listed '
      'above); the others were predicted'
    )


if __name__ == '__main__':
  run(main)
