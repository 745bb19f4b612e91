"""Dilated DenseNet-121/161/169/201 (Huang et al. 2017) for DenseASPP.

Following the DenseASPP paper (Yang et al., CVPR 2018) and its official
PyTorch model, output stride 8 keeps the stem (conv s2 + max-pool s2) and
transition 1's pooling, drops the pooling of transitions 2 and 3, and dilates
dense block 3 by 2 and block 4 by 4. Output stride 16 keeps transition 2's
pooling and dilates block 4 by 2 only (block 3 undilated).

The official model also has a transition 4 (BN-ReLU-1x1 conv halving the
channels, no pooling) after block 4, before `norm5`; torchvision's DenseNet
has none. `transition4=True` reproduces the official layout.

Attribute names follow torchvision (`conv0`, `denseblock1[0].norm1`,
`transition1.conv`, `norm5`) so converting its weights is a key rename.
The output is `norm5`'s, before any ReLU, as torchvision's `features`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deeplab_jax.models import dense_scan, layers

VARIANTS = {
  # depth: (growth rate, stem width, dense block sizes)
  121: (32, 64, (6, 12, 24, 16)),
  161: (48, 96, (6, 12, 36, 24)),
  169: (32, 64, (6, 12, 32, 32)),
  201: (32, 64, (6, 12, 48, 32)),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseNetConfig:
  """Hyper-parameters of a dilated DenseNet."""

  growth_rate: int = 48
  init_features: int = 96
  blocks: tuple[int, ...] = VARIANTS[161][2]
  bn_size: int = 4
  output_stride: int = 8
  transition4: bool = True

  def plan(self) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """Whether transitions 1-3 pool, and the dilation of blocks 1-4."""
    if self.output_stride == 8:
      return (True, False, False), (1, 1, 2, 4)
    if self.output_stride == 16:
      return (True, True, False), (1, 1, 1, 2)
    raise ValueError(
      f'DenseNet output_stride must be 8 or 16, got {self.output_stride}'
    )


class DenseLayer(nnx.Module):
  """BN-ReLU-1x1 conv (bn_size * growth) - BN-ReLU-3x3 conv (growth)."""

  def __init__(
    self,
    in_channels: int,
    growth_rate: int,
    bn_size: int,
    dilation: int,
    *,
    rngs: nnx.Rngs,
  ):
    mid = bn_size * growth_rate
    self.norm1 = layers.BatchNorm(in_channels)
    self.conv1 = layers.Conv2d(in_channels, mid, 1, rngs=rngs)
    self.norm2 = layers.BatchNorm(mid)
    self.conv2 = layers.Conv2d(
      mid, growth_rate, 3, dilation=dilation, rngs=rngs
    )

  def __call__(
    self,
    features: Sequence[jax.Array],
    stats: Sequence[tuple[jax.Array, jax.Array]],
  ) -> jax.Array:
    """The new features from the block's feature maps so far (to be read
    concatenated) and their `layers.batch_stats`."""
    return self.expand(self.bottleneck(_concat(features), _concat_stats(stats)))

  def bottleneck(
    self, x: jax.Array, stats: tuple[jax.Array, jax.Array]
  ) -> jax.Array:
    """BN-ReLU-1x1 conv of the concatenated maps `x` (batch `stats`)."""
    return self.conv1(jax.nn.relu(self.norm1(x, stats)))

  def expand(self, y: jax.Array) -> jax.Array:
    """BN-ReLU-3x3 conv of the bottleneck: the layer's new maps."""
    return self.conv2(jax.nn.relu(self.norm2(y)))


def _concat(arrays: Sequence[jax.Array]) -> jax.Array:
  return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=-1)


def _concat_stats(stats: Sequence[tuple[jax.Array, jax.Array]]):
  """The `(mean, var)` of the concatenation, from its parts'."""
  means, variances = zip(*stats, strict=True)
  return _concat(means), _concat(variances)


class Transition(nnx.Module):
  """BN-ReLU-1x1 conv, then 2x2 average pooling when `pool`."""

  def __init__(
    self, in_channels: int, out_channels: int, pool: bool, *, rngs: nnx.Rngs
  ):
    self.norm = layers.BatchNorm(in_channels)
    self.conv = layers.Conv2d(in_channels, out_channels, 1, rngs=rngs)
    self.pool = pool

  def __call__(
    self, x: jax.Array, stats: tuple[jax.Array, jax.Array] | None = None
  ) -> jax.Array:
    """`stats`: `x`'s `layers.batch_stats`, where the caller has them."""
    y = self.conv(jax.nn.relu(self.norm(x, stats)))
    return layers.avg_pool(y, 2, 2) if self.pool else y


class DenseNet(layers.RematBlocks, nnx.Module):
  """Dilated DenseNet; returns `{'layer1': stride-4 features, 'out': norm5}`.

  On XLA:CPU each dense block runs as scans over chunks of its layers
  (`dense_scan`), measured faster there; other platforms unroll
  the layers until a measurement there says otherwise.
  `scan_blocks` (`model.scan_blocks`) scans them on every platform;
  `scan_dense_layers` (a view) forces either; `remat_blocks` unrolls them
  (it rematerialises each layer).
  """

  scan_dense_layers: bool | None = None  # None: scanned on XLA:CPU only

  def set_view(
    self,
    remat_blocks: bool | None = None,
    scan_blocks: bool | None = None,
    platform: str | None = None,
    scan_dense_layers: bool | None = None,
  ):
    """Used by `nnx.view`: as `RematBlocks`, and `scan_dense_layers`."""
    super().set_view(
      remat_blocks=remat_blocks, scan_blocks=scan_blocks, platform=platform
    )
    if scan_dense_layers is not None:
      self.scan_dense_layers = scan_dense_layers

  def __init__(self, config: DenseNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    pools, dilations = config.plan()
    c = config.init_features
    self.conv0 = layers.Conv2d(3, c, 7, stride=2, padding=3, rngs=rngs)
    self.norm0 = layers.BatchNorm(c)
    blocks, transitions = [], []
    for i, n in enumerate(config.blocks):
      dense = []
      for _ in range(n):
        dense.append(
          DenseLayer(
            c, config.growth_rate, config.bn_size, dilations[i], rngs=rngs
          )
        )
        c += config.growth_rate
      blocks.append(nnx.List(dense))
      if i < 3 or config.transition4:
        transitions.append(Transition(c, c // 2, i < 3 and pools[i], rngs=rngs))
        c //= 2
      else:
        transitions.append(None)
    self.denseblock1, self.denseblock2 = blocks[0], blocks[1]
    self.denseblock3, self.denseblock4 = blocks[2], blocks[3]
    self.transition1, self.transition2 = transitions[0], transitions[1]
    self.transition3, self.transition4 = transitions[2], transitions[3]
    self.norm5 = layers.BatchNorm(c)
    self.out_channels = c
    self.low_level_channels = config.init_features + (
      config.blocks[0] * config.growth_rate
    )

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = jax.nn.relu(self.norm0(self.conv0(x)))
    x = layers.max_pool(x, 3, 2, 1)
    feats = {}
    for i in range(1, 5):
      block = list(getattr(self, f'denseblock{i}'))
      if self._scans_dense_layers():
        x, block_stats = dense_scan.scanned_dense_block(
          block, x, self.config.growth_rate, cpu=self.platform == 'cpu'
        )
      else:
        x, block_stats = self._dense_block(block, x)
      if i == 1:
        feats['layer1'] = x
      transition = getattr(self, f'transition{i}')
      if transition is not None:
        x = transition(x, block_stats)
    feats['out'] = self.norm5(x, block_stats if transition is None else None)
    return feats

  def _scans_dense_layers(self) -> bool:
    if self.remat_blocks:
      return False
    if self.scan_dense_layers is not None:
      return self.scan_dense_layers
    # `model.scan_blocks` scans the dense layers on any platform.
    return self.scan_blocks or self.platform == 'cpu'

  def _dense_block(self, block: Sequence[DenseLayer], x: jax.Array):
    """The block's output (all its maps concatenated) and its channels'
    batch statistics."""
    # Every layer normalises the concatenation of all maps so far, whose
    # channels' batch statistics never change: each map's are computed once
    # and shared (the same numbers; torchvision recomputes them per layer).
    # Unused, and removed by XLA, when BatchNorm runs on its running
    # averages.
    features = [x]
    stats = [layers.batch_stats(x)]
    for layer in block:
      # `block` ends with the fusion barrier: a map's gradient sums a slice
      # of every later layer's, which XLA:CPU then adds up once.
      features.append(self.block(layer, features, stats))
      stats.append(layers.batch_stats(features[-1]))
    return _concat(features), _concat_stats(stats)
