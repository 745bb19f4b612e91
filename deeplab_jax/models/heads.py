"""Segmentation heads: ASPP, the DeepLabV3 head and the FCN auxiliary head.

ASPP follows Chen et al. 2017 ("Rethinking Atrous Convolution", sec. 3.3)
as torchvision builds it: a 1x1 branch, three 3x3 atrous branches, image
pooling, each conv followed by BN and ReLU, concatenated, projected by a
1x1 conv-BN-ReLU and dropped out at 0.5 in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deeplab_jax.models import layers


def conv3x3_bn_relu(
  in_channels: int,
  out_channels: int,
  *,
  dilation: int = 1,
  separable: bool = False,
  bn_between: bool = True,
  rngs: nnx.Rngs,
) -> nnx.Module:
  """A 3x3 conv-BN-ReLU, plain or depthwise-separable (see SeparableConvBN)."""
  if separable:
    return layers.SeparableConvBN(
      in_channels,
      out_channels,
      3,
      dilation=dilation,
      bn_between=bn_between,
      rngs=rngs,
    )
  return layers.ConvBN(
    in_channels, out_channels, 3, dilation=dilation, rngs=rngs
  )


class ASPP(nnx.Module):
  """Atrous spatial pyramid pooling.

  Args:
    in_channels: channels of the backbone's last feature map.
    rates: dilation of the 3x3 branches (12/24/36 at OS8, 6/12/18 at OS16).
    channels: width of every branch and of the projection.
    separable: depthwise-separable 3x3 branches (DeepLabV3+ with Xception).
    separable_bn_between: BN + ReLU also between depthwise and pointwise
      (the paper); `False` is segmentation_models_pytorch's form.
    dropout: dropout after the projection, in training only.
  """

  def __init__(
    self,
    in_channels: int,
    rates: Sequence[int],
    *,
    channels: int = 256,
    separable: bool = False,
    separable_bn_between: bool = True,
    dropout: float = 0.5,
    rngs: nnx.Rngs,
  ):
    branches = [layers.ConvBN(in_channels, channels, 1, rngs=rngs)]
    for r in rates:
      branches.append(
        conv3x3_bn_relu(
          in_channels,
          channels,
          dilation=r,
          separable=separable,
          bn_between=separable_bn_between,
          rngs=rngs,
        )
      )
    self.branches = nnx.List(branches)
    self.pooling = layers.ConvBN(in_channels, channels, 1, rngs=rngs)
    n = len(branches) + 1
    self.project = layers.ConvBN(n * channels, channels, 1, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    outs = [branch(x) for branch in self.branches]
    pooled = self.pooling(layers.global_avg_pool(x))
    outs.append(jnp.broadcast_to(pooled, outs[0].shape))
    y = self.project(jnp.concatenate(outs, axis=-1))
    return self.dropout(y)


class DeepLabV3Head(nnx.Module):
  """ASPP, a 3x3 conv-BN-ReLU and a 1x1 classifier (torchvision DeepLabHead)."""

  def __init__(
    self,
    in_channels: int,
    num_classes: int,
    rates: Sequence[int],
    *,
    channels: int = 256,
    dropout: float = 0.5,
    rngs: nnx.Rngs,
  ):
    self.aspp = ASPP(
      in_channels, rates, channels=channels, dropout=dropout, rngs=rngs
    )
    self.conv = layers.ConvBN(channels, channels, 3, rngs=rngs)
    self.classifier = layers.Conv2d(
      channels, num_classes, 1, use_bias=True, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.classifier(self.conv(self.aspp(x)))


class FCNHead(nnx.Module):
  """Auxiliary head (torchvision FCNHead): 3x3 conv-BN-ReLU to in/4, dropout
  0.1, 1x1 classifier."""

  def __init__(
    self,
    in_channels: int,
    num_classes: int,
    *,
    dropout: float = 0.1,
    rngs: nnx.Rngs,
  ):
    inter = in_channels // 4
    self.conv = layers.ConvBN(in_channels, inter, 3, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = layers.Conv2d(
      inter, num_classes, 1, use_bias=True, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.classifier(self.dropout(self.conv(x)))


class DenseASPPBlock(nnx.Module):
  """One atrous layer of DenseASPP: [BN] - ReLU - 1x1 conv (d0) - BN - ReLU -
  3x3 atrous conv (d1), convs with bias, channel dropout in training."""

  def __init__(
    self,
    in_channels: int,
    d0: int,
    d1: int,
    rate: int,
    *,
    bn_start: bool,
    bn_momentum: float,
    dropout: float,
    rngs: nnx.Rngs,
  ):
    self.norm1 = (
      layers.BatchNorm(in_channels, momentum=bn_momentum) if bn_start else None
    )
    self.conv1 = layers.Conv2d(in_channels, d0, 1, use_bias=True, rngs=rngs)
    self.norm2 = layers.BatchNorm(d0, momentum=bn_momentum)
    self.conv2 = layers.Conv2d(
      d0, d1, 3, dilation=rate, use_bias=True, rngs=rngs
    )
    # Dropout2d: whole channels, shared over H and W.
    self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x if self.norm1 is None else self.norm1(x)
    y = self.conv1(jax.nn.relu(y))
    y = self.conv2(jax.nn.relu(self.norm2(y)))
    return self.dropout(y)


class DenseASPPHead(nnx.Module):
  """Densely connected atrous convolutions (Yang et al. 2018) + classifier.

  Each block reads the concatenation of the backbone features and every
  earlier block's output; its own output is concatenated in front. As in the
  official model, the backbone features in that concatenation are ReLU'd
  (its first block applies its ReLU in place to the backbone output).
  """

  def __init__(
    self,
    in_channels: int,
    num_classes: int,
    rates: Sequence[int],
    *,
    d0: int,
    d1: int,
    dropout: float = 0.1,
    classifier_dropout: float = 0.1,
    bn_momentum: float = 0.9997,
    rngs: nnx.Rngs,
  ):
    blocks, c = [], in_channels
    for i, rate in enumerate(rates):
      blocks.append(
        DenseASPPBlock(
          c,
          d0,
          d1,
          rate,
          bn_start=i > 0,
          bn_momentum=bn_momentum,
          dropout=dropout,
          rngs=rngs,
        )
      )
      c += d1
    self.blocks = nnx.List(blocks)
    self.dropout = nnx.Dropout(
      classifier_dropout, broadcast_dims=(1, 2), rngs=rngs
    )
    self.classifier = layers.Conv2d(c, num_classes, 1, use_bias=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(x)
    for block in self.blocks:
      x = jnp.concatenate([block(x), x], axis=-1)
    return self.classifier(self.dropout(x))


class DeepLabV3PlusHead(nnx.Module):
  """DeepLabV3+ decoder (Chen et al. 2018, sec. 3.1) on top of ASPP.

  ASPP output (optionally followed by segmentation_models_pytorch's extra
  separable conv) is upsampled bilinearly to the stride-4 low-level
  features, which a 1x1 conv-BN-ReLU reduces to 48 channels; the two are
  concatenated, refined by `num_convs` 3x3 conv-BN-ReLUs (2 in the paper, 1
  in smp) and classified by a 1x1 conv.
  """

  def __init__(
    self,
    in_channels: int,
    low_level_channels: int,
    num_classes: int,
    rates: Sequence[int],
    *,
    channels: int = 256,
    low_level_out: int = 48,
    num_convs: int = 2,
    aspp_separable: bool = False,
    decoder_separable: bool = False,
    separable_bn_between: bool = True,
    aspp_extra_conv: bool = False,
    dropout: float = 0.5,
    align_corners: bool = False,
    rngs: nnx.Rngs,
  ):
    self.aspp = ASPP(
      in_channels,
      rates,
      channels=channels,
      separable=aspp_separable,
      separable_bn_between=separable_bn_between,
      dropout=dropout,
      rngs=rngs,
    )
    self.aspp_conv = (
      conv3x3_bn_relu(
        channels,
        channels,
        separable=True,
        bn_between=separable_bn_between,
        rngs=rngs,
      )
      if aspp_extra_conv
      else None
    )
    self.low_level = layers.ConvBN(
      low_level_channels, low_level_out, 1, rngs=rngs
    )
    convs, c = [], channels + low_level_out
    for _ in range(num_convs):
      convs.append(
        conv3x3_bn_relu(
          c,
          channels,
          separable=decoder_separable,
          bn_between=separable_bn_between,
          rngs=rngs,
        )
      )
      c = channels
    self.convs = nnx.List(convs)
    self.classifier = layers.Conv2d(c, num_classes, 1, use_bias=True, rngs=rngs)
    self.align_corners = align_corners

  def __call__(self, x: jax.Array, low_level: jax.Array) -> jax.Array:
    x = self.aspp(x)
    if self.aspp_conv is not None:
      x = self.aspp_conv(x)
    x = layers.resize_bilinear(
      x, low_level.shape[1:3], align_corners=self.align_corners
    )
    x = jnp.concatenate([x, self.low_level(low_level)], axis=-1)
    for conv in self.convs:
      x = conv(x)
    return self.classifier(x)


class LRASPPHead(nnx.Module):
  """Lite R-ASPP (Howard et al. 2019, "Searching for MobileNetV3", sec.
  6.1.2), torchvision's `LRASPPHead`: a 1x1 conv-BN-ReLU of the high-level
  features gated by a sigmoid of their image mean (1x1 conv), resized to
  the low-level map, classified and added to a 1x1 classifier of the
  low-level features."""

  def __init__(
    self,
    low_channels: int,
    high_channels: int,
    num_classes: int,
    *,
    inter_channels: int = 128,
    rngs: nnx.Rngs,
  ):
    self.cbr = layers.ConvBN(high_channels, inter_channels, 1, rngs=rngs)
    self.scale = layers.Conv2d(high_channels, inter_channels, 1, rngs=rngs)
    self.low_classifier = layers.Conv2d(
      low_channels, num_classes, 1, use_bias=True, rngs=rngs
    )
    self.high_classifier = layers.Conv2d(
      inter_channels, num_classes, 1, use_bias=True, rngs=rngs
    )

  def __call__(
    self, low: jax.Array, high: jax.Array, *, align_corners: bool = False
  ) -> jax.Array:
    gate = jax.nn.sigmoid(self.scale(layers.global_avg_pool(high)))
    x = self.cbr(high) * gate
    x = layers.resize_bilinear(x, low.shape[1:3], align_corners=align_corners)
    return self.low_classifier(low) + self.high_classifier(x)
