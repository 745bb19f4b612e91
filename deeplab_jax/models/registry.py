"""Architecture names -> constructors; the one place models are built."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deeplab_jax.errors import ConfigError
from deeplab_jax.models import densenet, resnet, segmenter


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """A named architecture: the model class and its default config."""

  model: Callable[..., nnx.Module]
  config: Any
  description: str


_ARCHS: dict[str, ArchSpec] = {}

# DenseASPP head widths (d_feature0, d_feature1) per backbone, from the
# official configs DeepMotionAIResearch/DenseASPP cfgs/DenseASPP{121,161,
# 169,201}.py and cfgs/MobileNetDenseASPP.py.
DENSEASPP_HEAD_WIDTHS = {
  121: (128, 64),
  161: (512, 128),
  169: (336, 168),
  201: (480, 240),
  'mobilenet_v2': (128, 64),
}


def register(name: str, spec: ArchSpec) -> None:
  """Adds an architecture name (used by the model modules)."""
  _ARCHS[name] = spec


def _register_builtin() -> None:
  v3 = segmenter.DeepLabV3Config
  for depth in (50, 101, 152):
    register(
      f'deeplabv3_resnet{depth}',
      ArchSpec(
        segmenter.DeepLabV3,
        v3(blocks=resnet.DEPTHS[depth]),
        f'DeepLabV3, atrous ResNet-{depth} (torchvision layout)',
      ),
    )
  register(
    'deeplabv3_resnet_tiny',
    ArchSpec(
      segmenter.DeepLabV3,
      v3(blocks=(1, 1, 1, 1), width=8, aspp_channels=16),
      'DeepLabV3 on a 4-block, width-8 ResNet (tests and smoke runs)',
    ),
  )
  register(
    'deeplabv3_mobilenet_v3_large',
    ArchSpec(
      segmenter.DeepLabV3,
      v3(
        backbone='mobilenet_v3_large',
        output_stride=16,
        atrous_rates=(12, 24, 36),
      ),
      'DeepLabV3, dilated MobileNetV3-Large (torchvision layout)',
    ),
  )
  register(
    'lraspp_mobilenet_v3_large',
    ArchSpec(
      segmenter.LRASPP,
      segmenter.LRASPPConfig(),
      'LR-ASPP, dilated MobileNetV3-Large (torchvision layout)',
    ),
  )
  v3plus = segmenter.DeepLabV3PlusConfig
  for depth in (50, 101):
    register(
      f'deeplabv3plus_resnet{depth}',
      ArchSpec(
        segmenter.DeepLabV3Plus,
        v3plus(resnet_blocks=resnet.DEPTHS[depth]),
        f'DeepLabV3+, atrous ResNet-{depth}',
      ),
    )
  separable = dict(aspp_separable=True, decoder_separable=True)
  for depth in (65, 71):
    register(
      f'deeplabv3plus_xception{depth}',
      ArchSpec(
        segmenter.DeepLabV3Plus,
        v3plus(backbone='xception', xception_depth=depth, **separable),
        f'DeepLabV3+, aligned Xception-{depth} (timm layout)',
      ),
    )
  register(
    'deeplabv3plus_resnet_tiny',
    ArchSpec(
      segmenter.DeepLabV3Plus,
      v3plus(resnet_blocks=(1, 1, 1, 1), resnet_width=8, aspp_channels=16),
      'DeepLabV3+ on a 4-block, width-8 ResNet (tests and smoke runs)',
    ),
  )
  register(
    'deeplabv3plus_xception_tiny',
    ArchSpec(
      segmenter.DeepLabV3Plus,
      v3plus(
        backbone='xception',
        xception_middle_blocks=1,
        xception_width_divisor=8,
        aspp_channels=16,
        **separable,
      ),
      'DeepLabV3+ on an Xception-65 with 1 middle block, widths / 8',
    ),
  )
  for depth, (growth, stem, blocks) in densenet.VARIANTS.items():
    d0, d1 = DENSEASPP_HEAD_WIDTHS[depth]
    register(
      f'denseaspp{depth}',
      ArchSpec(
        segmenter.DenseASPP,
        segmenter.DenseASPPConfig(
          growth_rate=growth, init_features=stem, blocks=blocks, d0=d0, d1=d1
        ),
        f'DenseASPP on dilated DenseNet-{depth} (official layout)',
      ),
    )
  d0, d1 = DENSEASPP_HEAD_WIDTHS['mobilenet_v2']
  register(
    'denseaspp_mobilenet_v2',
    ArchSpec(
      segmenter.DenseASPP,
      segmenter.DenseASPPConfig(
        backbone='mobilenet_v2', os16_upsample=False, d0=d0, d1=d1
      ),
      'DenseASPP on the dilated MobileNetV2 (official MobileNetDenseASPP)',
    ),
  )
  register(
    'denseaspp_tiny',
    ArchSpec(
      segmenter.DenseASPP,
      segmenter.DenseASPPConfig(
        growth_rate=8, init_features=16, blocks=(2, 2, 2, 2), d0=16, d1=8
      ),
      'DenseASPP on a 4x2-layer, growth-8 DenseNet (tests and smoke runs)',
    ),
  )


_register_builtin()


def names() -> list[str]:
  """All known architecture names."""
  return sorted(_ARCHS)


def spec(arch: str) -> ArchSpec:
  """The `ArchSpec` of `arch`; an unknown name lists the known ones."""
  if arch not in _ARCHS:
    close = difflib.get_close_matches(arch, _ARCHS, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise ConfigError(
      f'unknown arch {arch!r}.{hint} Known: {", ".join(names())}'
    )
  return _ARCHS[arch]


def _coerce(config_cls: type, name: str, value: Any) -> Any:
  """JSON and flags give lists where the config holds tuples."""
  hint = typing.get_type_hints(config_cls)[name]
  if isinstance(value, list) and 'tuple' in str(hint):
    return tuple(value)
  return value


def make_config(arch: str, **overrides: Any) -> Any:
  """The frozen config of `arch` with `overrides` applied (validated)."""
  default = spec(arch).config
  fields = {f.name for f in dataclasses.fields(default)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(
      f'{arch} has no option(s) {", ".join(unknown)}; valid: '
      f'{", ".join(sorted(fields))}'
    )
  cls = type(default)
  values = {k: _coerce(cls, k, v) for k, v in overrides.items()}
  return dataclasses.replace(default, **values)


def create(
  arch: str, *, num_classes: int, rngs: nnx.Rngs, **overrides: Any
) -> nnx.Module:
  """Builds `arch` with `num_classes` outputs; see `names()` for the archs.

  Args:
    arch: architecture name, e.g. `'deeplabv3_resnet50'`.
    num_classes: number of output classes.
    rngs: random streams for initialisation and dropout.
    **overrides: config fields to change, e.g. `output_stride=16`,
      `atrous_rates=(6, 12, 18)`, `aux_head=True`, `align_corners=True`.

  Returns:
    The model, in training mode; `nnx.view(model, use_running_average=True,
    deterministic=True)` gives its inference view. `model.arch` holds `arch`.
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f'num_classes must be a positive int, got {num_classes}')
  config = make_config(arch, **overrides)
  model = spec(arch).model(config, num_classes=num_classes, rngs=rngs)
  model.arch = arch
  return model


def describe(model: nnx.Module) -> dict[str, Any]:
  """JSON-able arch, class count and full config: enough to rebuild it."""
  config = dataclasses.asdict(model.config)
  return {
    'arch': model.arch,
    'num_classes': model.num_classes,
    'config': config,
  }


def from_description(desc: Mapping[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  """Inverse of `describe` (weights not included)."""
  return create(
    desc['arch'], num_classes=desc['num_classes'], rngs=rngs, **desc['config']
  )


def platform_of(devices) -> str:
  """The platform a program compiled for `devices` (a mesh, or a sequence
  of devices or device descriptions) runs on: `'cpu'`, `'gpu'` or `'tpu'`
  (every device must agree)."""
  if isinstance(devices, jax.sharding.Mesh):
    devices = devices.devices.flat
  kinds = {_PLATFORM_NAMES.get(d.platform, d.platform) for d in devices}
  if len(kinds) != 1:
    raise ConfigError(f'devices of several platforms: {sorted(kinds)}')
  return kinds.pop()


# `jax.export` and device descriptions may spell a GPU by its runtime.
_PLATFORM_NAMES = {'cuda': 'gpu', 'rocm': 'gpu'}


def platform_view(model: nnx.Module, platform: str) -> nnx.Module:
  """`model` (sharing its weights) with every module told the platform its
  program is compiled for (`platform_of`): the one place kernels are
  chosen. `'cpu'` selects the XLA:CPU lowerings of `models.xla_cpu`; GPU
  and TPU programs get XLA's own kernels (and on GPU the measured im2col
  rule for dilated convolutions, `conv_lowering.choose_lowering`)."""
  platform = _PLATFORM_NAMES.get(platform, platform)
  return nnx.view(model, platform=platform, raise_if_not_found=False)


def materialize(rest: nnx.State, seed: int = 0) -> nnx.State:
  """Concrete values for abstract non-weight state (dropout RNG streams).

  Loading weights into an `nnx.eval_shape` model skips the slow random
  initialisation; only the RNG streams then need real values.
  """

  def make(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree.map(make, rest)
