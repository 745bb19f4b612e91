r"""Converts PyTorch weights into a self-describing deeplab-jax checkpoint.

  python -m scripts.convert_torch --arch deeplabv3_resnet50 \
      --input deeplabv3_resnet50.pth --output ckpt/deeplabv3_r50
  python -m scripts.convert_torch --input torchvision:deeplabv3_resnet101 \
      --output ckpt/deeplabv3_r101_voc

`--input` is a `.pth`/`.pt`, `.safetensors` or `.npz` file, or a published
name or URL (README, "Published weights"): fetched into its client's cache
and checked against the hash its source states (`--sha256` or
`URL#sha256=HEX` states one); `--arch` defaults to the name's
architecture.

The source layout (torchvision, ...) is detected from the keys; the number
of classes is read from the classifier unless --num_classes is given, and
the input normalisation recorded is the one the layout's published
checkpoints were trained with unless --normalization is given. The
output directory can then be used as `--checkpoint` by the other scripts.
"""

import shutil

from absl import flags

from deeplab_jax import checkpointing
from deeplab_jax.cli import entry_point, output_dir, parse_options, run
from deeplab_jax.convert import sources
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.data import normalization
from deeplab_jax.errors import UserError

_ARCH = flags.DEFINE_string(
  'arch',
  None,
  "Architecture, e.g. deeplabv3_resnet50 (default: a published name's).",
)
_INPUT = flags.DEFINE_string(
  'input',
  None,
  'A .pth/.pt, .safetensors or .npz file, or a published name, e.g. '
  'torchvision:deeplabv3_resnet101 or hf-hub:timm/resnet101.tv_in1k.',
)
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
_NORMALIZATION = flags.DEFINE_string(
  'normalization',
  None,
  'Input statistics to record: imagenet, inception, denseaspp_cityscapes, or '
  'MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B in 0-255 units. Default: what '
  "the source's checkpoints were trained with (official DenseASPP: "
  'denseaspp_cityscapes; timm Xception: inception; torchvision, smp, other '
  'timm: imagenet).',
)
_SHA256 = flags.DEFINE_string(
  'sha256', None, "--input's SHA-256 (or pass URL#sha256=HEX)."
)
_FORCE = flags.DEFINE_bool('force', False, 'Overwrite a non-empty --output.')


def _rounded(values):
  return '(' + ', '.join(f'{v:.3f}' for v in values) + ')'


def _default_arch(source):
  if source is None or len(source.archs) != 1:
    choices = f' ({", ".join(source.archs)})' if source else ''
    raise UserError(f'pass --arch{choices}')
  return source.archs[0]


@entry_point
def main(argv):
  del argv
  with output_dir(_OUTPUT.value, force=_FORCE.value) as out:
    if _NORMALIZATION.value is not None:
      mean, std = normalization.parse(_NORMALIZATION.value)
    if _ARCH.value:
      sources.check_arch(_INPUT.value, _ARCH.value, '--input')
    state_dict, fetched = sources.read(
      _INPUT.value, sha256=_SHA256.value, flag='--input'
    )
    arch = _ARCH.value or _default_arch(fetched.source)
    model = torch_convert.load(
      arch,
      state_dict,
      num_classes=_NUM_CLASSES.value,
      **parse_options(_OPTION.value, 'option'),
    )
    if _NORMALIZATION.value is None:
      mean, std = (
        fetched.source.normalization
        if fetched.source
        else model.source_normalization
      )
    meta = checkpointing.model_metadata(
      model,
      class_names=_CLASS_NAMES.value,
      mean=mean,
      std=std,
      extra={
        'source': {'layout': model.source_layout, **fetched.record()},
      },
    )
    shutil.rmtree(out)  # --force replaces what was there
    path = checkpointing.save_model(out, model, meta)
  print(
    f'converted {_INPUT.value} ({model.source_layout}) -> {path}: '
    f'{model.arch}, {model.num_classes} classes, inputs normalised with '
    f'mean {_rounded(mean)} std {_rounded(std)} (0-255 units)\n'
    f'next: python -m scripts.predict --checkpoint {out} --input IMAGES '
    '--output predictions'
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['input', 'output'])
  run(main)
