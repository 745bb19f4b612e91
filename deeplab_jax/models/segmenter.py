"""Whole segmentation models: backbone + head + resize to the input size.

Every model maps normalised images `[B, H, W, 3]` to a dict of logits at
input size: `'out'` (main head) and, when the auxiliary head is on, `'aux'`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deeplab_jax.errors import ConfigError
from deeplab_jax.models import (
  densenet,
  heads,
  initializers,
  layers,
  mobilenet,
  resnet,
  xception,
)


def upsample_logits(
  logits: jax.Array, size: tuple[int, int], align_corners: bool
) -> jax.Array:
  """Bilinear upsampling to the input size, then float32 logits.

  The resize runs in the compute dtype, as PyTorch autocast leaves
  `F.interpolate`: in bfloat16 its two matmuls use the tensor cores instead
  of the GPU's much slower full-precision float32 path.
  """
  up = layers.resize_bilinear(logits, size, align_corners=align_corners)
  return up.astype(jnp.float32)


def _backbone(model: str, name: str, builders: dict, rngs: nnx.Rngs):
  """`builders[name](rngs)`, or one line naming the backbones `model`
  can use."""
  if name not in builders:
    raise ConfigError(
      f'{model} backbone must be one of {", ".join(map(repr, builders))}, '
      f'not {name!r}'
    )
  return builders[name](rngs)


def _mobilenet_v3(config, rngs: nnx.Rngs) -> mobilenet.MobileNetV3:
  return mobilenet.MobileNetV3(
    mobilenet.MobileNetV3Config(
      output_stride=config.output_stride, width_mult=config.width_mult
    ),
    rngs=rngs,
  )


DEFAULT_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


class _AsppRates:
  """`rates` of an ASPP config: `atrous_rates`, or the paper's rates for
  the output stride when it is None."""

  @property
  def rates(self) -> tuple[int, ...]:
    if self.atrous_rates is not None:
      return tuple(self.atrous_rates)
    return DEFAULT_RATES[self.output_stride]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepLabV3Config(_AsppRates):
  """Hyper-parameters of DeepLabV3 on an atrous ResNet or MobileNetV3.

  Defaults are torchvision's `deeplabv3_resnet50`: output stride 8, ASPP
  rates 12/24/36 (`atrous_rates=None` picks 6/12/18 at stride 16), 256
  channels, dropout 0.5, bilinear resize with `align_corners=False`.
  `backbone='mobilenet_v3_large'` is torchvision's
  `deeplabv3_mobilenet_v3_large` with `output_stride=16`,
  `atrous_rates=(12, 24, 36)` (`blocks`, `width` and `multi_grid` are
  then unused; `width_mult` scales the MobileNet).
  """

  backbone: str = 'resnet'  # or 'mobilenet_v3_large'
  width_mult: float = 1.0
  blocks: tuple[int, ...] = resnet.DEPTHS[50]
  width: int = 64
  output_stride: int = 8
  multi_grid: tuple[int, ...] | None = None
  atrous_rates: tuple[int, ...] | None = None
  aspp_channels: int = 256
  dropout: float = 0.5
  aux_head: bool = False
  align_corners: bool = False
  dtype: str = 'float32'


class DeepLabV3(nnx.Module):
  """DeepLabV3 (Chen et al. 2017): atrous ResNet, ASPP head, FCN aux head."""

  def __init__(
    self, config: DeepLabV3Config, *, num_classes: int, rngs: nnx.Rngs
  ):
    self.config = config
    self.num_classes = num_classes
    self.backbone = _backbone(
      'DeepLabV3',
      config.backbone,
      {
        'resnet': lambda rngs: resnet.ResNet(
          resnet.ResNetConfig(
            blocks=config.blocks,
            width=config.width,
            output_stride=config.output_stride,
            multi_grid=config.multi_grid,
          ),
          rngs=rngs,
        ),
        'mobilenet_v3_large': lambda rngs: _mobilenet_v3(config, rngs),
      },
      rngs,
    )
    ch = self.backbone.channels()
    # The head reads the last map, the auxiliary head the stride-8 one.
    self.features = ('high', 'low') if 'high' in ch else ('layer4', 'layer3')
    self.head = heads.DeepLabV3Head(
      ch[self.features[0]],
      num_classes,
      config.rates,
      channels=config.aspp_channels,
      dropout=config.dropout,
      rngs=rngs,
    )
    self.aux_head = (
      heads.FCNHead(ch[self.features[1]], num_classes, rngs=rngs)
      if config.aux_head
      else None
    )
    # torchvision: the heads keep nn.Conv2d's default initialisation.
    key = rngs.params()
    for i, head in enumerate((self.head, self.aux_head)):
      if head is not None:
        initializers.reinit_convs(
          head,
          jax.random.fold_in(key, i),
          initializers.torch_default,
          torch_default_bias=True,
        )

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    size = images.shape[1:3]
    x = images.astype(jnp.dtype(self.config.dtype))
    feats = self.backbone(x)
    up = lambda y: upsample_logits(y, size, self.config.align_corners)
    out = {'out': up(self.head(feats[self.features[0]]))}
    if self.aux_head is not None:
      out['aux'] = up(self.aux_head(feats[self.features[1]]))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LRASPPConfig:
  """Hyper-parameters of LR-ASPP on MobileNetV3-Large; the defaults are
  torchvision's `lraspp_mobilenet_v3_large` (output stride 16, 128
  intermediate channels, `align_corners=False`)."""

  output_stride: int = 16
  width_mult: float = 1.0
  inter_channels: int = 128
  align_corners: bool = False
  dtype: str = 'float32'


class LRASPP(nnx.Module):
  """Lite R-ASPP on MobileNetV3-Large (Howard et al. 2019)."""

  def __init__(self, config: LRASPPConfig, *, num_classes: int, rngs: nnx.Rngs):
    self.config = config
    self.num_classes = num_classes
    self.backbone = _mobilenet_v3(config, rngs)
    ch = self.backbone.channels()
    self.head = heads.LRASPPHead(
      ch['low'],
      ch['high'],
      num_classes,
      inter_channels=config.inter_channels,
      rngs=rngs,
    )
    # torchvision: the head keeps nn.Conv2d's default initialisation.
    initializers.reinit_convs(
      self.head,
      rngs.params(),
      initializers.torch_default,
      torch_default_bias=True,
    )

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    size = images.shape[1:3]
    x = images.astype(jnp.dtype(self.config.dtype))
    feats = self.backbone(x)
    ac = self.config.align_corners
    logits = self.head(feats['low'], feats['high'], align_corners=ac)
    return {'out': upsample_logits(logits, size, ac)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseASPPConfig:
  """Hyper-parameters of DenseASPP on a dilated DenseNet.

  Defaults are the official DenseASPP-161 configuration (DeepMotionAIResearch
  /DenseASPP `cfgs/DenseASPP161.py`): growth 48, stem 96, blocks
  (6, 12, 36, 24), transition 4 on, rates 3/6/12/18/24, d0/d1 = 512/128,
  dropout 0.1 in the head and before the classifier, head BN momentum 0.0003
  in PyTorch's convention (0.9997 here). `align_corners=False` for new models
  (PyTorch's current default); converted official checkpoints set `True`,
  which is what PyTorch 0.3.1's `nn.Upsample` did when they were trained.

  `backbone='mobilenet_v2'` is the official `MobileNetDenseASPP`
  (`models/MobileNetDenseASPP.py`, `cfgs/MobileNetDenseASPP.py`: d0/d1 =
  128/64; the DenseNet fields are then unused). `os16_upsample`: features
  at output stride 16 are upsampled x2 before the head, as the official
  DenseNet model does. The official MobileNet model registers the same
  upsample on a module whose forward never calls it, so its head runs at
  stride 16: `os16_upsample=False` there.
  """

  backbone: str = 'densenet'  # or 'mobilenet_v2'
  width_mult: float = 1.0
  os16_upsample: bool = True
  growth_rate: int = 48
  init_features: int = 96
  blocks: tuple[int, ...] = densenet.VARIANTS[161][2]
  bn_size: int = 4
  output_stride: int = 8
  transition4: bool = True
  atrous_rates: tuple[int, ...] = (3, 6, 12, 18, 24)
  d0: int = 512
  d1: int = 128
  dropout: float = 0.1
  classifier_dropout: float = 0.1
  head_bn_momentum: float = 0.9997
  align_corners: bool = False
  dtype: str = 'float32'


class DenseASPP(nnx.Module):
  """DenseASPP (Yang et al., CVPR 2018) for high-resolution street scenes."""

  def __init__(
    self, config: DenseASPPConfig, *, num_classes: int, rngs: nnx.Rngs
  ):
    self.config = config
    self.num_classes = num_classes
    self.backbone = _backbone(
      'DenseASPP',
      config.backbone,
      {
        'densenet': lambda rngs: densenet.DenseNet(
          densenet.DenseNetConfig(
            growth_rate=config.growth_rate,
            init_features=config.init_features,
            blocks=config.blocks,
            bn_size=config.bn_size,
            output_stride=config.output_stride,
            transition4=config.transition4,
          ),
          rngs=rngs,
        ),
        'mobilenet_v2': lambda rngs: mobilenet.DilatedMobileNetV2(
          mobilenet.MobileNetV2Config(
            output_stride=config.output_stride, width_mult=config.width_mult
          ),
          rngs=rngs,
        ),
      },
      rngs,
    )
    self.head = heads.DenseASPPHead(
      self.backbone.out_channels,
      num_classes,
      config.atrous_rates,
      d0=config.d0,
      d1=config.d1,
      dropout=config.dropout,
      classifier_dropout=config.classifier_dropout,
      bn_momentum=config.head_bn_momentum,
      rngs=rngs,
    )
    # The official model draws every conv, backbone included, Kaiming
    # uniform (fan-in); biases keep PyTorch's default.
    initializers.reinit_convs(
      self,
      rngs.params(),
      initializers.kaiming_uniform_fan_in,
      torch_default_bias=True,
    )

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    size = images.shape[1:3]
    x = images.astype(jnp.dtype(self.config.dtype))
    feats = self.backbone(x)['out']
    ac = self.config.align_corners
    if self.config.output_stride == 16 and self.config.os16_upsample:
      # The official model upsamples stride-16 features x2 before the head.
      h, w = feats.shape[1:3]
      feats = layers.resize_bilinear(feats, (2 * h, 2 * w), align_corners=ac)
    return {'out': upsample_logits(self.head(feats), size, ac)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepLabV3PlusConfig(_AsppRates):
  """Hyper-parameters of DeepLabV3+ (Chen et al. 2018).

  Defaults follow the paper: output stride 16, ASPP rates 6/12/18 (12/24/36
  at stride 8 when `atrous_rates=None`), a 48-channel low-level projection,
  two 3x3 decoder convs of 256 channels, separable ASPP and decoder convs
  with BN + ReLU after the depthwise conv for Xception, plain ones for
  ResNet. segmentation_models_pytorch's `DeepLabV3Plus` corresponds to
  `atrous_rates=(12, 24, 36)`, `aspp_separable=True`, `aspp_extra_conv=True`,
  `decoder_convs=1`, `decoder_separable=True`, `separable_bn_between=False`,
  `align_corners=True` and, for ResNets, `resnet_uniform_dilation=True`; the
  converter sets these for smp checkpoints.
  """

  backbone: str = 'resnet'  # 'resnet' or 'xception'
  resnet_blocks: tuple[int, ...] = resnet.DEPTHS[50]
  resnet_width: int = 64
  resnet_uniform_dilation: bool = False
  multi_grid: tuple[int, ...] | None = None
  xception_depth: int = 65
  xception_middle_blocks: int = 16
  xception_width_divisor: int = 1
  output_stride: int = 16
  atrous_rates: tuple[int, ...] | None = None
  aspp_channels: int = 256
  aspp_separable: bool = False
  aspp_extra_conv: bool = False
  aspp_dropout: float = 0.5
  low_level_channels: int = 48
  decoder_convs: int = 2
  decoder_separable: bool = False
  separable_bn_between: bool = True
  aux_head: bool = False
  align_corners: bool = False
  dtype: str = 'float32'


class DeepLabV3Plus(nnx.Module):
  """DeepLabV3+: atrous ResNet or aligned Xception, ASPP, decoder."""

  def __init__(
    self, config: DeepLabV3PlusConfig, *, num_classes: int, rngs: nnx.Rngs
  ):
    self.config = config
    self.num_classes = num_classes
    if config.backbone == 'xception' and config.aux_head:
      raise ConfigError('aux_head needs a ResNet backbone (layer3 features)')
    self.backbone = _backbone(
      'DeepLabV3+',
      config.backbone,
      {
        'resnet': lambda rngs: resnet.ResNet(
          resnet.ResNetConfig(
            blocks=config.resnet_blocks,
            width=config.resnet_width,
            output_stride=config.output_stride,
            multi_grid=config.multi_grid,
            uniform_dilation=config.resnet_uniform_dilation,
          ),
          rngs=rngs,
        ),
        'xception': lambda rngs: xception.Xception(
          xception.XceptionConfig(
            depth=config.xception_depth,
            output_stride=config.output_stride,
            middle_blocks=config.xception_middle_blocks,
            width_divisor=config.xception_width_divisor,
          ),
          rngs=rngs,
        ),
      },
      rngs,
    )
    if config.backbone == 'resnet':
      ch = self.backbone.channels()
      high, low = ch['layer4'], ch['layer1']
    else:
      high = self.backbone.out_channels
      low = self.backbone.low_level_channels
    self.head = heads.DeepLabV3PlusHead(
      high,
      low,
      num_classes,
      config.rates,
      channels=config.aspp_channels,
      low_level_out=config.low_level_channels,
      num_convs=config.decoder_convs,
      aspp_separable=config.aspp_separable,
      decoder_separable=config.decoder_separable,
      separable_bn_between=config.separable_bn_between,
      aspp_extra_conv=config.aspp_extra_conv,
      dropout=config.aspp_dropout,
      align_corners=config.align_corners,
      rngs=rngs,
    )
    self.aux_head = (
      heads.FCNHead(self.backbone.channels()['layer3'], num_classes, rngs=rngs)
      if config.aux_head
      else None
    )
    # smp: decoder convs Kaiming uniform (fan-in), the classifier Xavier
    # uniform, biases zero; the aux head as torchvision's.
    key = rngs.params()
    initializers.reinit_convs(
      self.head,
      key,
      initializers.kaiming_uniform_fan_in,
      torch_default_bias=False,
    )
    initializers.reinit_convs(
      self.head.classifier,
      jax.random.fold_in(key, 1),
      initializers.xavier_uniform,
      torch_default_bias=False,
    )
    if self.aux_head is not None:
      initializers.reinit_convs(
        self.aux_head,
        jax.random.fold_in(key, 2),
        initializers.torch_default,
        torch_default_bias=True,
      )

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    size = images.shape[1:3]
    x = images.astype(jnp.dtype(self.config.dtype))
    feats = self.backbone(x)
    high = feats['layer4'] if 'layer4' in feats else feats['out']
    up = lambda y: upsample_logits(y, size, self.config.align_corners)
    out = {'out': up(self.head(high, feats['layer1']))}
    if self.aux_head is not None:
      out['aux'] = up(self.aux_head(feats['layer3']))
    return out
