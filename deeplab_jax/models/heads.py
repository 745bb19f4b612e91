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


class ASPP(nnx.Module):
  """Atrous spatial pyramid pooling.

  Args:
    in_channels: channels of the backbone's last feature map.
    rates: dilation of the 3x3 branches (12/24/36 at OS8, 6/12/18 at OS16).
    channels: width of every branch and of the projection.
    separable: depthwise-separable 3x3 branches (DeepLabV3+ with Xception).
    dropout: dropout after the projection, in training only.
  """

  def __init__(
    self,
    in_channels: int,
    rates: Sequence[int],
    *,
    channels: int = 256,
    separable: bool = False,
    dropout: float = 0.5,
    rngs: nnx.Rngs,
  ):
    branches = [layers.ConvBN(in_channels, channels, 1, rngs=rngs)]
    for r in rates:
      if separable:
        branches.append(
          layers.SeparableConvBN(
            in_channels, channels, 3, dilation=r, rngs=rngs
          )
        )
      else:
        branches.append(
          layers.ConvBN(in_channels, channels, 3, dilation=r, rngs=rngs)
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
