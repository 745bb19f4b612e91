r"""Converts a PyTorch checkpoint into a self-describing deeplab-jax checkpoint.

  python -m scripts.convert_torch --arch deeplabv3_resnet50 \
      --input deeplabv3_resnet50.pth --output ckpt/deeplabv3_r50

The source layout (torchvision, ...) is detected from the keys; the number
of classes is read from the classifier unless --num_classes is given. The
output directory can then be used as `--checkpoint` by the other scripts.
"""

import json
import os

from absl import app, flags

from deeplab_jax import checkpointing
from deeplab_jax.cli import entry_point
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.errors import ConfigError, UserError

_ARCH = flags.DEFINE_string(
  'arch', None, 'Architecture, e.g. deeplabv3_resnet50.'
)
_INPUT = flags.DEFINE_string('input', None, 'PyTorch .pth/.pt file or .npz.')
_OUTPUT = flags.DEFINE_string('output', None, 'Checkpoint directory to write.')
_NUM_CLASSES = flags.DEFINE_integer(
  'num_classes', None, 'Classes; read from the classifier when unset.'
)
_CLASS_NAMES = flags.DEFINE_list(
  'class_names', None, 'Comma-separated class names to record.'
)
_OPTION = flags.DEFINE_multi_string(
  'option', [], 'Model option KEY=JSON_VALUE, e.g. output_stride=16.'
)
_FORCE = flags.DEFINE_bool('force', False, 'Overwrite a non-empty --output.')


def _options(items):
  options = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise ConfigError(f'--option {item!r} must be KEY=VALUE')
    try:
      options[key] = json.loads(value)
    except json.JSONDecodeError:
      options[key] = value
  return options


@entry_point
def main(argv):
  del argv
  out = os.path.abspath(_OUTPUT.value)
  if os.path.isdir(out) and os.listdir(out) and not _FORCE.value:
    raise UserError(f'--output {out} is not empty; pass --force to replace it')
  if os.path.isdir(out) and _FORCE.value:
    import shutil

    shutil.rmtree(out)
  state_dict = torch_convert.read_state_dict(_INPUT.value)
  model = torch_convert.load(
    _ARCH.value,
    state_dict,
    num_classes=_NUM_CLASSES.value,
    **_options(_OPTION.value),
  )
  meta = checkpointing.model_metadata(
    model,
    class_names=_CLASS_NAMES.value,
    extra={'source': {'layout': model.source_layout, 'file': _INPUT.value}},
  )
  path = checkpointing.save_model(out, model, meta)
  print(
    f'converted {_INPUT.value} ({model.source_layout}) -> {path}: '
    f'{model.arch}, {model.num_classes} classes'
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['arch', 'input', 'output'])
  app.run(main)
