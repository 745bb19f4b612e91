"""MobileNet backbones: torchvision's MobileNetV3-Large and the official
DenseASPP's dilated MobileNetV2.

MobileNetV3 (Howard et al., "Searching for MobileNetV3", 2019) as
torchvision builds it for segmentation (`mobilenet_v3_large(dilated=True)`):
inverted residual blocks with hard-swish or ReLU, squeeze-excitation whose
scale goes through a hard sigmoid, BatchNorm eps 1e-3 and PyTorch momentum
0.01, and the last stage (C4) with stride 1 and dilation 2, so the features
end at output stride 16. The module tree mirrors torchvision's
(`features[i].block[j]`), which keeps the converter's key map short.

The dilated MobileNetV2 is DeepMotionAIResearch/DenseASPP
`models/MobileNetDenseASPP.py`: a ReLU stem, every block with its 1x1
expansion (even at ratio 1) and ReLU6, no final 1x1 conv (320 features),
and from the 64-channel stage on either stride 1 with dilation 2 (output
stride 8) or stride 2 without dilation (output stride 16).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from flax import nnx

from deeplab_jax.errors import ConfigError
from deeplab_jax.models import layers

# torchvision's MobileNetV3 BatchNorm: eps 1e-3, PyTorch momentum 0.01.
V3_BN = dict(epsilon=1e-3, bn_momentum=0.99)


def make_divisible(value: float, divisor: int = 8) -> int:
  """Channels rounded to a multiple of `divisor`, never below 90% of
  `value` (the rule of the MobileNet papers' reference code, which
  torchvision's `_make_divisible` follows)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcitation(nnx.Module):
  """Channel gate: mean over the image, 1x1 conv, ReLU, 1x1 conv, hard
  sigmoid, times the input (torchvision's `SqueezeExcitation` with the
  MobileNetV3 `scale_activation`)."""

  def __init__(self, channels: int, squeeze: int, *, rngs: nnx.Rngs):
    self.fc1 = layers.Conv2d(channels, squeeze, 1, use_bias=True, rngs=rngs)
    self.fc2 = layers.Conv2d(squeeze, channels, 1, use_bias=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    s = jax.nn.relu(self.fc1(layers.global_avg_pool(x)))
    return x * jax.nn.hard_sigmoid(self.fc2(s))


class InvertedResidual(nnx.Module):
  """Expansion 1x1, depthwise kxk, [squeeze-excitation], linear 1x1; the
  input is added when the block keeps its shape. `block` lists the layers
  in order, as both PyTorch sources do."""

  def __init__(self, block: Sequence[nnx.Module], residual: bool):
    self.block = nnx.List(block)
    self.residual = residual

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    for layer in self.block:
      y = layer(y)
    return x + y if self.residual else y


# torchvision `_mobilenet_v3_conf('mobilenet_v3_large')`: input channels,
# kernel, expanded channels, output channels, squeeze-excitation,
# activation, stride. C1-C4 are the blocks with stride 2.
V3_LARGE = (
  (16, 3, 16, 16, False, 'relu', 1),
  (16, 3, 64, 24, False, 'relu', 2),  # C1
  (24, 3, 72, 24, False, 'relu', 1),
  (24, 5, 72, 40, True, 'relu', 2),  # C2: `low` (output stride 8)
  (40, 5, 120, 40, True, 'relu', 1),
  (40, 5, 120, 40, True, 'relu', 1),
  (40, 3, 240, 80, False, 'hardswish', 2),  # C3
  (80, 3, 200, 80, False, 'hardswish', 1),
  (80, 3, 184, 80, False, 'hardswish', 1),
  (80, 3, 184, 80, False, 'hardswish', 1),
  (80, 3, 480, 112, True, 'hardswish', 1),
  (112, 3, 672, 112, True, 'hardswish', 1),
  (112, 5, 672, 160, True, 'hardswish', 2),  # C4: dilated at stride 16
  (160, 5, 960, 160, True, 'hardswish', 1),
  (160, 5, 960, 160, True, 'hardswish', 1),
)
# Index in `features` of the output-stride-8 map (the end of C2's stage).
V3_LOW_INDEX = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class MobileNetV3Config:
  """`output_stride` 16 (torchvision's `dilated=True`) or 32;
  `width_mult` scales every width (rounded by `make_divisible`)."""

  output_stride: int = 16
  width_mult: float = 1.0


class MobileNetV3(layers.RematBlocks, nnx.Module):
  """MobileNetV3-Large features. Returns `low` (output stride 8: the
  output of C2's strided block, `features[4]`, where torchvision takes its
  LR-ASPP and auxiliary inputs) and `high` (the last 1x1 conv's hard-swish
  output, 6x the last block's width)."""

  def __init__(self, config: MobileNetV3Config, *, rngs: nnx.Rngs):
    if config.output_stride not in (16, 32):
      raise ConfigError(
        f'MobileNetV3 output_stride must be 16 or 32, not '
        f'{config.output_stride}'
      )
    self.config = config
    ch = lambda c: make_divisible(c * config.width_mult)
    dilation = 2 if config.output_stride == 16 else 1
    stem = ch(V3_LARGE[0][0])
    features = [
      layers.ConvBN(
        3, stem, 3, stride=2, activation='hardswish', **V3_BN, rngs=rngs
      )
    ]
    for i, (cin, k, exp, cout, se, act, stride) in enumerate(V3_LARGE):
      cin, exp, cout = ch(cin), ch(exp), ch(cout)
      d = dilation if i >= 12 else 1  # C4's stage
      block = []
      if exp != cin:
        block.append(
          layers.ConvBN(cin, exp, 1, activation=act, **V3_BN, rngs=rngs)
        )
      block.append(
        layers.ConvBN(
          exp,
          exp,
          k,
          stride=1 if d > 1 else stride,
          dilation=d,
          groups=exp,
          activation=act,
          **V3_BN,
          rngs=rngs,
        )
      )
      if se:
        block.append(
          SqueezeExcitation(exp, make_divisible(exp // 4), rngs=rngs)
        )
      block.append(
        layers.ConvBN(exp, cout, 1, activation='none', **V3_BN, rngs=rngs)
      )
      features.append(InvertedResidual(block, stride == 1 and cin == cout))
    last = ch(V3_LARGE[-1][3])
    features.append(
      layers.ConvBN(
        last, 6 * last, 1, activation='hardswish', **V3_BN, rngs=rngs
      )
    )
    self.features = nnx.List(features)

  def channels(self) -> dict[str, int]:
    """Channels of `low` and `high`."""
    ch = lambda c: make_divisible(c * self.config.width_mult)
    return {
      'low': ch(V3_LARGE[V3_LOW_INDEX - 1][3]),
      'high': 6 * ch(V3_LARGE[-1][3]),
    }

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    layers_ = list(self.features)
    low = self.stage(layers_[: V3_LOW_INDEX + 1], x)
    return {'low': low, 'high': self.stage(layers_[V3_LOW_INDEX + 1 :], low)}


# The official DilatedMobileNetV2's stages: expansion, channels, blocks,
# stride at output stride 8 (the 64-channel stage's stride becomes 2 and
# its and later stages' dilation 1 at output stride 16).
V2_STAGES = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 1),
  (6, 96, 3, 1),
  (6, 160, 3, 1),
  (6, 320, 1, 1),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MobileNetV2Config:
  """`output_stride` 8 or 16; `width_mult` scales every width."""

  output_stride: int = 8
  width_mult: float = 1.0


class DilatedMobileNetV2(layers.RematBlocks, nnx.Module):
  """The official DenseASPP MobileNetV2 (`features.features[i].conv`).
  Returns `out` at the output stride; `out_channels` wide."""

  def __init__(self, config: MobileNetV2Config, *, rngs: nnx.Rngs):
    if config.output_stride not in (8, 16):
      raise ConfigError(
        f'the dilated MobileNetV2 output_stride must be 8 or 16, not '
        f'{config.output_stride}'
      )
    self.config = config
    scale = config.output_stride // 8
    cin = int(32 * config.width_mult)
    features = [layers.ConvBN(3, cin, 3, stride=2, rngs=rngs)]
    for stage, (t, c, n, s) in enumerate(V2_STAGES):
      cout = int(c * config.width_mult)
      stride = scale if stage == 3 else s
      d = 2 // scale if stage >= 3 else 1
      for j in range(n):
        exp = cin * t
        block = [
          layers.ConvBN(cin, exp, 1, activation='relu6', rngs=rngs),
          layers.ConvBN(
            exp,
            exp,
            3,
            stride=stride if j == 0 else 1,
            dilation=d,
            groups=exp,
            activation='relu6',
            rngs=rngs,
          ),
          layers.ConvBN(exp, cout, 1, activation='none', rngs=rngs),
        ]
        residual = (stride if j == 0 else 1) == 1 and cin == cout
        features.append(InvertedResidual(block, residual))
        cin = cout
    self.features = nnx.List(features)
    self.out_channels = cin

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    return {'out': self.stage(list(self.features), x)}
