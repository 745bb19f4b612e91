"""PyTorch `state_dict` -> deeplab-jax model, one key map per source layout.

The source layout is detected from the keys. Each layout is a list of regex
renames from PyTorch module paths to ours; leaves convert generically:
`weight` of a conv (`OIHW`) -> `kernel` (`HWIO`), `weight` of a BatchNorm
-> `scale`, `running_mean`/`running_var` -> `mean`/`var`, `bias` -> `bias`.
A load that would leave any of our weights unset, or would drop a source
weight, is refused with the keys and shapes named.

Supported layouts:
- `torchvision_deeplabv3`: `torchvision.models.segmentation.deeplabv3_*`,
  with or without `aux_classifier`.
- `torchvision_deeplabv3_mobilenet`, `torchvision_lraspp`: torchvision's
  `deeplabv3_mobilenet_v3_large` (with or without `aux_classifier`) and
  `lraspp_mobilenet_v3_large`.
- `official_denseaspp`: the DenseASPP authors' PyTorch model (whole model).
- `official_mobilenet_denseaspp`: their `MobileNetDenseASPP` (whole model;
  pass `output_stride=16` for a stride-16 checkpoint).
- `torchvision_densenet`: `torchvision.models.densenet*` ImageNet weights as
  a DenseASPP backbone; the head starts fresh.
- `smp_deeplabv3plus`: segmentation_models_pytorch `DeepLabV3Plus` with
  `resnet50/101` or `tu-xception65/71` encoders (whole model; smp's decoder
  options are set from the keys and smp's defaults).
- `timm_xception`: timm `xception65/71` ImageNet weights as a DeepLabV3+
  backbone; the head starts fresh.
- `torchvision_resnet`, `torchvision_mobilenet_v3`: torchvision's ImageNet
  ResNet-50/101/152 (also timm's `resnet*.tv_in1k`) and MobileNetV3-Large
  as DeepLabV3 / V3+ / LR-ASPP backbones; the heads start fresh.

This module does not import torch: tensors are read through `.numpy()`, and
NumPy arrays work as well.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from deeplab_jax.data import normalization
from deeplab_jax.errors import CheckpointMismatchError, UserError
from deeplab_jax.models import registry

_MAX_LISTED = 8


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one PyTorch source names its weights.

  Attributes:
    name: short identifier, recorded in converted checkpoints.
    description: what produces this layout.
    detect: `keys -> bool`.
    renames: `(pattern, replacement)` regexes applied in order to each key,
      or `state_dict -> renames` when they depend on which keys exist.
    arch_prefixes: arch names this layout can be loaded into.
    num_classes: `state_dict -> int`, read from the classifier.
    overrides: `state_dict -> dict` of model options implied by the keys.
    suggest_arch: `state_dict -> arch name or None` for error messages.
    ignore: `model config -> regexes` of source keys that are not used
      (beyond `num_batches_tracked`), e.g. an ImageNet classifier.
    fresh: `model config -> prefixes` of our weights that the source does
      not have and that keep their random initialisation (a backbone-only
      source leaves the head fresh). Everything else must be loaded.
    normalization: `(mean, std)` (0-255 units) of the inputs this source's
      published checkpoints were trained on; converted checkpoints record
      it.
  """

  name: str
  description: str
  detect: Callable[[set[str]], bool]
  renames: (
    tuple[tuple[str, str | Callable[[re.Match], str]], ...]
    | Callable[[Mapping[str, np.ndarray]], tuple]
  )
  arch_prefixes: tuple[str, ...]
  num_classes: Callable[[Mapping[str, np.ndarray]], int | None]
  overrides: Callable[[Mapping[str, np.ndarray]], dict[str, Any]]
  suggest_arch: Callable[[Mapping[str, np.ndarray]], str | None]
  ignore: Callable[[Any], tuple[str, ...]] = lambda config: ()
  fresh: Callable[[Any], tuple[str, ...]] = lambda config: ()
  normalization: tuple[tuple[float, ...], tuple[float, ...]] = (
    normalization.IMAGENET
  )

  def rules(self, sd: Mapping[str, np.ndarray]) -> tuple:
    """The renames for this state dict (some depend on which keys exist)."""
    return self.renames(sd) if callable(self.renames) else self.renames

  def rename(self, key: str, rules: tuple) -> str:
    """The name of `key` in our model (module path + PyTorch leaf name)."""
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    return key


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r'(\d+)\.')
  ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
  return len(ids)


def _resnet_arch(prefix: str, family: str):
  def suggest(sd):
    depth = {6: 50, 23: 101, 36: 152}.get(_count_blocks(sd, prefix))
    return f'{family}{depth}' if depth else None

  return suggest


_TORCHVISION_DEEPLABV3 = Layout(
  name='torchvision_deeplabv3',
  description='torchvision.models.segmentation.deeplabv3_resnet{50,101}',
  detect=lambda keys: (
    'classifier.0.convs.0.0.weight' in keys and 'backbone.conv1.weight' in keys
  ),
  renames=(
    (r'^backbone\.', 'backbone.'),
    (r'\.downsample\.0\.', '.downsample.conv.'),
    (r'\.downsample\.1\.', '.downsample.bn.'),
    (r'^classifier\.0\.convs\.([0-3])\.0\.', r'head.aspp.branches.\1.conv.'),
    (r'^classifier\.0\.convs\.([0-3])\.1\.', r'head.aspp.branches.\1.bn.'),
    (r'^classifier\.0\.convs\.4\.1\.', 'head.aspp.pooling.conv.'),
    (r'^classifier\.0\.convs\.4\.2\.', 'head.aspp.pooling.bn.'),
    (r'^classifier\.0\.project\.0\.', 'head.aspp.project.conv.'),
    (r'^classifier\.0\.project\.1\.', 'head.aspp.project.bn.'),
    (r'^classifier\.1\.', 'head.conv.conv.'),
    (r'^classifier\.2\.', 'head.conv.bn.'),
    (r'^classifier\.4\.', 'head.classifier.'),
    (r'^aux_classifier\.0\.', 'aux_head.conv.conv.'),
    (r'^aux_classifier\.1\.', 'aux_head.conv.bn.'),
    (r'^aux_classifier\.4\.', 'aux_head.classifier.'),
  ),
  arch_prefixes=('deeplabv3_resnet',),
  num_classes=lambda sd: int(sd['classifier.4.weight'].shape[0]),
  overrides=lambda sd: {
    'aux_head': any(k.startswith('aux_classifier.') for k in sd)
  },
  suggest_arch=_resnet_arch('backbone.layer3.', 'deeplabv3_resnet'),
)

# torchvision's MobileNetV3 segmentation backbones: `backbone.N` is
# `features[N]`; a block's layers are `block.M` (conv-BN-act `.0`/`.1`, or
# squeeze-excitation `fc1`/`fc2`).
_MOBILENET_V3_RENAMES = (
  (
    r'^backbone\.(\d+)\.block\.(\d+)\.0\.',
    r'backbone.features.\1.block.\2.conv.',
  ),
  (
    r'^backbone\.(\d+)\.block\.(\d+)\.1\.',
    r'backbone.features.\1.block.\2.bn.',
  ),
  (r'^backbone\.(\d+)\.block\.(\d+)\.fc', r'backbone.features.\1.block.\2.fc'),
  (r'^backbone\.(\d+)\.0\.', r'backbone.features.\1.conv.'),
  (r'^backbone\.(\d+)\.1\.', r'backbone.features.\1.bn.'),
)

_TORCHVISION_DEEPLABV3_MOBILENET = Layout(
  name='torchvision_deeplabv3_mobilenet',
  description='torchvision.models.segmentation.deeplabv3_mobilenet_v3_large',
  detect=lambda keys: (
    'classifier.0.convs.0.0.weight' in keys and 'backbone.0.0.weight' in keys
  ),
  renames=_MOBILENET_V3_RENAMES + _TORCHVISION_DEEPLABV3.renames[3:],
  arch_prefixes=('deeplabv3_mobilenet',),
  num_classes=_TORCHVISION_DEEPLABV3.num_classes,
  overrides=_TORCHVISION_DEEPLABV3.overrides,
  suggest_arch=lambda sd: 'deeplabv3_mobilenet_v3_large',
)

_TORCHVISION_LRASPP = Layout(
  name='torchvision_lraspp',
  description='torchvision.models.segmentation.lraspp_mobilenet_v3_large',
  detect=lambda keys: 'classifier.cbr.0.weight' in keys,
  renames=_MOBILENET_V3_RENAMES
  + (
    (r'^classifier\.cbr\.0\.', 'head.cbr.conv.'),
    (r'^classifier\.cbr\.1\.', 'head.cbr.bn.'),
    (r'^classifier\.scale\.1\.', 'head.scale.'),
    (r'^classifier\.', 'head.'),
  ),
  arch_prefixes=('lraspp_mobilenet',),
  num_classes=lambda sd: int(sd['classifier.low_classifier.weight'].shape[0]),
  overrides=lambda sd: {},
  suggest_arch=lambda sd: 'lraspp_mobilenet_v3_large',
)

# DenseNet keys: `denselayerN` is 1-based; our lists are 0-based. The
# official DenseASPP (and torchvision before 0.4) wrote `norm.1`, `conv.2`.
_DENSENET_RENAMES = (
  (r'^features\.', 'backbone.'),
  (r'\.denselayer(\d+)\.', lambda m: f'.{int(m.group(1)) - 1}.'),
  (r'\.(norm|relu|conv)\.([12])\.', r'.\1\2.'),
)
_DENSEASPP_BLOCKS = {3: 0, 6: 1, 12: 2, 18: 3, 24: 4}


def _densenet_arch(sd):
  depth = {24: 121, 36: 161, 32: 169, 48: 201}.get(
    _count_blocks(sd, 'features.denseblock3.denselayer')
  )
  return f'denseaspp{depth}' if depth else None


def _is_densenet(keys):
  return 'features.conv0.weight' in keys and any(
    k.startswith('features.denseblock1.denselayer1.') for k in keys
  )


_OFFICIAL_DENSEASPP = Layout(
  name='official_denseaspp',
  description='DeepMotionAIResearch/DenseASPP models/DenseASPP.py',
  detect=lambda keys: _is_densenet(keys) and 'ASPP_3.conv.1.weight' in keys,
  renames=(
    *_DENSENET_RENAMES,
    (
      r'^ASPP_(\d+)\.',
      lambda m: f'head.blocks.{_DENSEASPP_BLOCKS[int(m.group(1))]}.',
    ),
    (r'^classification\.1\.', 'head.classifier.'),
  ),
  arch_prefixes=('denseaspp',),
  num_classes=lambda sd: int(sd['classification.1.weight'].shape[0]),
  overrides=lambda sd: {
    # Trained with PyTorch 0.3.1, whose bilinear Upsample aligned corners.
    'align_corners': True,
    'transition4': any(k.startswith('features.transition4.') for k in sd),
    # The head widths differ per config (cfgs/DenseASPP*.py), and a user's
    # own config may set others: read them from the first ASPP block.
    'd0': int(sd['ASPP_3.conv.1.weight'].shape[0]),
    'd1': int(sd['ASPP_3.conv.2.weight'].shape[0]),
  },
  suggest_arch=_densenet_arch,
  normalization=normalization.DENSEASPP_CITYSCAPES,
)

# The official MobileNetDenseASPP: `features.features.N.conv.M`, M indexing
# expansion conv/BN (0, 1), depthwise conv/BN (3, 4), projection conv/BN
# (6, 7) around the ReLU6s; ours lists the three conv-BN(-act) layers.
_V2_CONV = {
  0: '0.conv',
  1: '0.bn',
  3: '1.conv',
  4: '1.bn',
  6: '2.conv',
  7: '2.bn',
}

_OFFICIAL_MOBILENET_DENSEASPP = Layout(
  name='official_mobilenet_denseaspp',
  description='DeepMotionAIResearch/DenseASPP models/MobileNetDenseASPP.py',
  detect=lambda keys: (
    'features.features.0.0.weight' in keys and 'ASPP_3.conv.1.weight' in keys
  ),
  renames=(
    (
      r'^features\.features\.(\d+)\.conv\.(\d)\.',
      lambda m: (
        f'backbone.features.{m.group(1)}.block.{_V2_CONV[int(m.group(2))]}.'
      ),
    ),
    (r'^features\.features\.0\.0\.', 'backbone.features.0.conv.'),
    (r'^features\.features\.0\.1\.', 'backbone.features.0.bn.'),
    *_OFFICIAL_DENSEASPP.renames[2:],
  ),
  arch_prefixes=('denseaspp_mobilenet',),
  num_classes=lambda sd: int(sd['classification.1.weight'].shape[0]),
  overrides=lambda sd: {
    'align_corners': True,  # PyTorch 0.3's Upsample, as the DenseNet model
    'd0': int(sd['ASPP_3.conv.1.weight'].shape[0]),
    'd1': int(sd['ASPP_3.conv.2.weight'].shape[0]),
  },
  suggest_arch=lambda sd: 'denseaspp_mobilenet_v2',
  normalization=normalization.DENSEASPP_CITYSCAPES,
)

_TORCHVISION_DENSENET = Layout(
  name='torchvision_densenet',
  description='torchvision.models.densenet121/161/169/201 (ImageNet '
  'backbone; the DenseASPP head starts fresh)',
  detect=lambda keys: (
    _is_densenet(keys) and not any(k.startswith('ASPP_') for k in keys)
  ),
  renames=_DENSENET_RENAMES,
  arch_prefixes=('denseaspp',),
  num_classes=lambda sd: None,
  overrides=lambda sd: {},
  suggest_arch=_densenet_arch,
  # torchvision's norm5 follows block 4; with the official transition 4 it
  # would sit at a different depth and width, so it starts fresh.
  ignore=lambda config: (
    (r'^classifier\.',)
    + ((r'^features\.norm5\.',) if config.transition4 else ())
  ),
  fresh=lambda config: (
    ('head.',)
    + (
      ('backbone.transition4.', 'backbone.norm5.') if config.transition4 else ()
    )
  ),
)

# timm's aligned Xception; `features_only` models flatten `stem.0` to
# `stem_0` and `blocks.3` to `blocks_3`.
_TIMM_XCEPTION_RENAMES = (
  (r'(^|\.)stem[._](\d)\.', r'\1stem.\2.'),
  (r'(^|\.)blocks[._](\d+)\.', r'\1blocks.\2.'),
  (r'\.stack\.conv(\d)\.', r'.conv\1.'),
)


def _xception_depth(sd, prefix):
  blocks = _count_blocks(sd, prefix + 'blocks.') or _count_blocks(
    sd, prefix + 'blocks_'
  )
  return {21: 65, 23: 71}.get(blocks)


def _smp_encoder(sd) -> str | None:
  """'resnet50', 'tu-xception65', ... from an smp state dict's keys."""
  if 'encoder.conv1.weight' in sd:
    depth = {6: 50, 23: 101, 36: 152}.get(_count_blocks(sd, 'encoder.layer3.'))
    return f'resnet{depth}' if depth else 'resnet'
  depth = _xception_depth(sd, 'encoder.model.')
  if depth:
    return f'tu-xception{depth}'
  return None


def smp_deeplabv3plus_options(
  *, aspp_separable: bool = True, aspp_extra_conv: bool = True, resnet: bool
) -> dict[str, Any]:
  """Model options that make a `deeplabv3plus_*` arch the network of
  `segmentation_models_pytorch.DeepLabV3Plus` (its defaults: separable ASPP
  at rates 12/24/36 followed by one more separable conv, one separable
  decoder conv, corner-aligned upsampling)."""
  options = {
    'align_corners': True,
    'atrous_rates': (12, 24, 36),
    'aspp_separable': aspp_separable,
    'aspp_extra_conv': aspp_extra_conv,
    'decoder_convs': 1,
    'decoder_separable': True,
    'separable_bn_between': False,
  }
  if resnet:
    options['resnet_uniform_dilation'] = True
  return options


def _smp_overrides(sd):
  return smp_deeplabv3plus_options(
    # A depthwise weight `[C, 1, 3, 3]` marks separable ASPP branches.
    aspp_separable='decoder.aspp.0.convs.1.0.0.weight' in sd,
    aspp_extra_conv='decoder.aspp.1.0.weight' in sd,
    resnet='encoder.conv1.weight' in sd,
  )


def _smp_arch(sd):
  encoder = _smp_encoder(sd) or ''
  return 'deeplabv3plus_' + encoder.removeprefix('tu-') if encoder else None


def _smp_renames(aspp_separable: bool) -> tuple:
  branch = r'^decoder\.aspp\.0\.convs\.([1-3])\.'
  if aspp_separable:  # (depthwise, pointwise), BN
    branches = (
      (branch + r'0\.0\.', r'head.aspp.branches.\1.conv_dw.'),
      (branch + r'0\.1\.', r'head.aspp.branches.\1.conv_pw.'),
      (branch + r'1\.', r'head.aspp.branches.\1.bn_pw.'),
    )
  else:  # conv, BN
    branches = (
      (branch + r'0\.', r'head.aspp.branches.\1.conv.'),
      (branch + r'1\.', r'head.aspp.branches.\1.bn.'),
    )
  return (
    (r'^encoder\.model\.', 'backbone.'),
    (r'^encoder\.', 'backbone.'),
    *_TIMM_XCEPTION_RENAMES,
    (r'\.downsample\.0\.', '.downsample.conv.'),
    (r'\.downsample\.1\.', '.downsample.bn.'),
    (r'^decoder\.aspp\.0\.convs\.0\.0\.', 'head.aspp.branches.0.conv.'),
    (r'^decoder\.aspp\.0\.convs\.0\.1\.', 'head.aspp.branches.0.bn.'),
    *branches,
    (r'^decoder\.aspp\.0\.convs\.4\.1\.', 'head.aspp.pooling.conv.'),
    (r'^decoder\.aspp\.0\.convs\.4\.2\.', 'head.aspp.pooling.bn.'),
    (r'^decoder\.aspp\.0\.project\.0\.', 'head.aspp.project.conv.'),
    (r'^decoder\.aspp\.0\.project\.1\.', 'head.aspp.project.bn.'),
    (r'^decoder\.aspp\.1\.0\.', 'head.aspp_conv.conv_dw.'),
    (r'^decoder\.aspp\.1\.1\.', 'head.aspp_conv.conv_pw.'),
    (r'^decoder\.aspp\.2\.', 'head.aspp_conv.bn_pw.'),
    (r'^decoder\.block1\.0\.', 'head.low_level.conv.'),
    (r'^decoder\.block1\.1\.', 'head.low_level.bn.'),
    (r'^decoder\.block2\.0\.0\.', 'head.convs.0.conv_dw.'),
    (r'^decoder\.block2\.0\.1\.', 'head.convs.0.conv_pw.'),
    (r'^decoder\.block2\.1\.', 'head.convs.0.bn_pw.'),
    (r'^segmentation_head\.0\.', 'head.classifier.'),
  )


_SMP_DEEPLABV3PLUS = Layout(
  name='smp_deeplabv3plus',
  description='segmentation_models_pytorch.DeepLabV3Plus (encoders resnet50, '
  'resnet101, tu-xception65, tu-xception71)',
  detect=lambda keys: (
    'decoder.aspp.0.convs.0.0.weight' in keys
    and 'segmentation_head.0.weight' in keys
  ),
  renames=lambda sd: _smp_renames(_smp_overrides(sd)['aspp_separable']),
  arch_prefixes=('deeplabv3plus_',),
  num_classes=lambda sd: int(sd['segmentation_head.0.weight'].shape[0]),
  overrides=_smp_overrides,
  suggest_arch=_smp_arch,
)


def _timm_xception_arch(sd):
  depth = _xception_depth(sd, '')
  return f'deeplabv3plus_xception{depth}' if depth else None


_TIMM_XCEPTION = Layout(
  name='timm_xception',
  description='timm xception65/xception71 (ImageNet backbone, also '
  'features_only; the DeepLabV3+ head starts fresh)',
  detect=lambda keys: (
    any(
      k.startswith(('blocks.0.stack.conv1.', 'blocks_0.stack.conv1.'))
      for k in keys
    )
    and any(k.startswith(('stem.0.conv.', 'stem_0.conv.')) for k in keys)
  ),
  renames=((r'^', 'backbone.'), *_TIMM_XCEPTION_RENAMES),
  arch_prefixes=('deeplabv3plus_xception',),
  num_classes=lambda sd: None,
  overrides=lambda sd: {},
  suggest_arch=_timm_xception_arch,
  ignore=lambda config: (r'^head\.fc\.',),
  fresh=lambda config: ('head.',),
  normalization=normalization.INCEPTION,
)


def _fresh_heads(config) -> tuple[str, ...]:
  """The heads a backbone-only source leaves fresh."""
  return ('head.',) + (('aux_head.',) if getattr(config, 'aux_head', 0) else ())


# torchvision's (and timm's `tv_in1k`) ImageNet ResNet: the same module names
# as torchvision's DeepLabV3 backbone, without the `backbone.` prefix.
_TORCHVISION_RESNET = Layout(
  name='torchvision_resnet',
  description='torchvision.models.resnet50/101/152, timm resnet*.tv_in1k '
  '(ImageNet backbone; the DeepLabV3 / V3+ head starts fresh)',
  detect=lambda keys: (
    'conv1.weight' in keys and 'layer1.0.conv1.weight' in keys
  ),
  renames=((r'^', 'backbone.'), *_TORCHVISION_DEEPLABV3.renames[1:3]),
  arch_prefixes=('deeplabv3_resnet', 'deeplabv3plus_resnet'),
  num_classes=lambda sd: None,
  overrides=lambda sd: {},
  # DeepLabV3 or V3+: either fits, so no single suggestion.
  suggest_arch=lambda sd: None,
  ignore=lambda config: (r'^fc\.',),
  fresh=_fresh_heads,
)

# torchvision's ImageNet MobileNetV3-Large: its `features` are the
# segmentation models' `backbone` (torchvision builds them from it).
_TORCHVISION_MOBILENET_V3 = Layout(
  name='torchvision_mobilenet_v3',
  description='torchvision.models.mobilenet_v3_large (ImageNet backbone; '
  'the DeepLabV3 / LR-ASPP head starts fresh)',
  detect=lambda keys: (
    'features.0.0.weight' in keys and 'features.2.block.0.0.weight' in keys
  ),
  renames=((r'^features\.', 'backbone.'), *_MOBILENET_V3_RENAMES),
  arch_prefixes=('deeplabv3_mobilenet', 'lraspp_mobilenet'),
  num_classes=lambda sd: None,
  overrides=lambda sd: {},
  suggest_arch=lambda sd: None,
  ignore=lambda config: (r'^classifier\.',),
  fresh=_fresh_heads,
)

LAYOUTS: tuple[Layout, ...] = (
  _TORCHVISION_DEEPLABV3,
  _TORCHVISION_DEEPLABV3_MOBILENET,
  _TORCHVISION_LRASPP,
  _OFFICIAL_MOBILENET_DENSEASPP,
  _SMP_DEEPLABV3PLUS,
  _OFFICIAL_DENSEASPP,
  _TORCHVISION_DENSENET,
  _TIMM_XCEPTION,
  _TORCHVISION_RESNET,
  _TORCHVISION_MOBILENET_V3,
)


def _to_numpy(value: Any) -> np.ndarray:
  """A private copy: `Tensor.numpy()` shares memory, and JAX on CPU may
  alias a NumPy buffer, so without the copy a later in-place update of the
  PyTorch model (an optimizer step) would change the converted weights."""
  if hasattr(value, 'detach'):  # a torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    return value.numpy().copy()
  return np.array(value, copy=True)


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Unwraps `{'state_dict': ...}`/`{'model': ...}`, strips `module.`."""
  for wrapper in ('state_dict', 'model', 'model_state'):
    inner = state_dict.get(wrapper) if isinstance(state_dict, Mapping) else None
    if isinstance(inner, Mapping):
      state_dict = inner
      break
  out = {}
  for k, v in state_dict.items():
    if not hasattr(v, 'shape'):
      continue  # e.g. a stored epoch counter
    out[k.removeprefix('module.')] = _to_numpy(v)
  return out


def detect_layout(state_dict: Mapping[str, Any]) -> Layout:
  """The layout whose keys `state_dict` has; a clear error otherwise."""
  keys = set(state_dict)
  for layout in LAYOUTS:
    if layout.detect(keys):
      return layout
  sample = ', '.join(sorted(keys)[:5])
  known = '; '.join(f'{lay.name} ({lay.description})' for lay in LAYOUTS)
  raise CheckpointMismatchError(
    f'unrecognised state dict layout (keys start {sample}, ...). Supported: '
    f'{known}.'
  )


def source_num_classes(state_dict: Mapping[str, Any]) -> int | None:
  """Classes of a whole-model state dict's classifier; `None` for a
  backbone-only source."""
  sd = clean_state_dict(state_dict)
  return detect_layout(sd).num_classes(sd)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  flat = {}
  for k, v in tree.items():
    path = (*prefix, k)
    if isinstance(v, Mapping):
      flat.update(_flatten(v, path))
    else:
      flat[path] = v
  return flat


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _dotted(path: tuple) -> str:
  return '.'.join(str(p) for p in path)


def _convert_leaf(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  module, _, leaf = key.rpartition('.')
  if leaf == 'weight' and value.ndim == 4:
    return f'{module}.kernel', value.transpose(2, 3, 1, 0)
  if leaf == 'weight' and value.ndim == 1:
    return f'{module}.scale', value
  if leaf == 'running_mean':
    return f'{module}.mean', value
  if leaf == 'running_var':
    return f'{module}.var', value
  return key, value


def _listing(items: list[str]) -> str:
  shown = ', '.join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f' (+{more} more)' if more > 0 else '')


def load(
  arch: str,
  state_dict: Mapping[str, Any],
  *,
  num_classes: int | None = None,
  seed: int = 0,
  **overrides: Any,
) -> nnx.Module:
  """Builds `arch` and fills it from a PyTorch `state_dict`.

  Args:
    arch: a name from `deeplab_jax.models.names()`.
    state_dict: `name -> torch.Tensor | np.ndarray`; a `module.` prefix and a
      `{'state_dict': ...}` wrapper are accepted.
    num_classes: classes of the model; read from the classifier when `None`.
    seed: seed of the model's dropout random stream.
    **overrides: model options (see `models.create`); options implied by the
      keys (e.g. `aux_head`) are set automatically unless given here.

  Returns:
    The model with every parameter and BatchNorm statistic converted, in
    training mode like `models.create`; `model.source_layout` names the
    detected layout, `model.source_normalization` the `(mean, std)` its
    checkpoints expect, and `model.fresh_weights` the parts a backbone-only
    source left randomly initialised (e.g. `('head',)`).

  Raises:
    CheckpointMismatchError: unknown layout, a layout that does not fit
      `arch`, or missing / unexpected keys / shape mismatches (all named).
  """
  sd = clean_state_dict(state_dict)
  layout = detect_layout(sd)
  registry.spec(arch)  # unknown arch -> ValueError listing the known ones
  suggestion = layout.suggest_arch(sd)
  hint = (
    f' (it looks like {suggestion})'
    if suggestion and suggestion != arch
    else ''
  )
  family = lambda name: name.rstrip('0123456789')
  wrong_family = suggestion and family(suggestion) != family(arch)
  if not arch.startswith(layout.arch_prefixes) or wrong_family:
    raise CheckpointMismatchError(
      f'this state dict is a {layout.name} checkpoint{hint}; it cannot be '
      f'loaded as {arch!r}. Use an arch starting with '
      f'{" or ".join(layout.arch_prefixes)}.'
    )
  if num_classes is None:
    num_classes = layout.num_classes(sd)
  if num_classes is None:
    raise CheckpointMismatchError(
      f'a {layout.name} state dict has no segmentation classifier; pass '
      'num_classes (--num_classes)'
    )
  options = {**layout.overrides(sd), **overrides}
  config = registry.make_config(arch, **options)
  fresh = layout.fresh(config)
  ignore = (r'(^|\.)num_batches_tracked$', *layout.ignore(config))
  build = lambda: registry.create(
    arch, num_classes=num_classes, rngs=nnx.Rngs(seed), **options
  )
  # Random initialisation is slow on CPU: skip it unless some weights stay
  # fresh (a backbone-only source).
  model = build() if fresh else nnx.eval_shape(build)
  graphdef, state, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
  expected = _flatten(nnx.to_pure_dict(state))
  by_name = {_dotted(p): p for p in expected}

  rules = layout.rules(sd)
  converted: dict[tuple, np.ndarray] = {}
  unexpected, mismatched, mismatched_paths = [], [], set()
  for key, value in sd.items():
    if any(re.search(p, key) for p in ignore):
      continue
    source_shape = tuple(value.shape)
    ours, value = _convert_leaf(layout.rename(key, rules), value)
    path = by_name.get(ours)
    if path is None or ours.startswith(fresh):
      unexpected.append(key)
      continue
    want = tuple(expected[path].shape)
    if tuple(value.shape) != want:
      mismatched.append(f'{key} {source_shape} vs {ours} {want}')
      mismatched_paths.add(path)
      continue
    converted[path] = value
  missing = [
    _dotted(p)
    for p in expected
    if p not in converted
    and p not in mismatched_paths
    and not _dotted(p).startswith(fresh)
  ]
  if missing or unexpected or mismatched:
    parts = []
    if mismatched:
      parts.append(
        f'{len(mismatched)} shape mismatch(es): {_listing(mismatched)}'
      )
    if missing:
      parts.append(f'{len(missing)} missing (our names): {_listing(missing)}')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected: {_listing(unexpected)}')
    raise CheckpointMismatchError(
      f'{layout.name} state dict does not fit {arch} '
      f'(num_classes={num_classes}){hint}: '
      + '; '.join(parts)
      + '. Check --arch, --num_classes and the model options.'
    )

  # device_put, not jnp.asarray: that compiles a program per shape.
  pure = _unflatten(
    {
      p: jax.device_put(np.asarray(v, dtype=expected[p].dtype))
      for p, v in converted.items()
    }
  )
  nnx.replace_by_pure_dict(state, pure)
  if not fresh:
    rest = registry.materialize(rest, seed)
  model = nnx.merge(graphdef, state, rest)
  model.source_layout = layout.name
  model.source_normalization = layout.normalization
  model.fresh_weights = tuple(p.rstrip('.') for p in fresh)
  return model


def read_state_dict(path: str) -> Mapping[str, Any]:
  """A state dict from a `.pth`/`.pt` (needs PyTorch) or `.npz` file."""

  if not os.path.isfile(path):
    raise UserError(f'{path} does not exist')
  if path.endswith('.npz'):
    try:
      with np.load(path) as f:
        return dict(f)
    except Exception as e:  # noqa: BLE001 - zip and format errors
      raise UserError(f'cannot read {path} as .npz ({e})') from e
  try:
    import torch
  except ImportError as e:
    raise UserError(
      'reading .pth files needs PyTorch: pip install torch (or save the '
      'state dict as .npz with numpy first)'
    ) from e
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - zip, pickle and torch errors
    if 'Weights only load failed' in str(e):
      # PyTorch's advice here (weights_only=False) would run the file's
      # code; a state dict of tensors never needs it.
      raise UserError(
        f'cannot read {path} as a PyTorch state dict: it is not a file of '
        'tensors (or it holds Python objects, which are never loaded: they '
        'could run code). Save the weights as '
        'torch.save(model.state_dict(), path) and pass that file'
      ) from e
    reason = ' '.join(str(e).split())[:200]
    raise UserError(
      f'cannot read {path} as a PyTorch state dict ({type(e).__name__}: '
      f'{reason}); is the file complete? Download or save it again'
    ) from e
