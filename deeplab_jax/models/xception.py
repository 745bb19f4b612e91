"""Aligned (modified) Xception-65/71, the DeepLabV3+ backbone.

Chen et al. 2018 ("Encoder-Decoder with Atrous Separable Convolution",
sec. 3.2) modify Xception: a deeper middle flow (16 blocks), every
max-pooling replaced by a strided depthwise-separable convolution, and BN +
ReLU after every depthwise 3x3. The block table, padding and dilation rule
follow timm's `xception65` / `xception71` so its weights (and
segmentation_models_pytorch's `tu-xception*` encoders) convert by key
rename: BN eps 1e-3 (a TensorFlow port); when a stride would pass the output
stride it becomes dilation, the converted block keeping the old dilation and
every later block using the new one.

Low-level features for the DeepLabV3+ decoder are taken, as timm's feature
taps, at the input of the strided separable conv of the block that goes
from stride 4 to 8 (after its ReLU).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from deeplab_jax.models import layers

BN_EPS = 1e-3

# (in, out per separable conv, stride) per block, before the exit flow.
_ENTRY = {
  65: ((64, 128, 2), (128, 256, 2), (256, 728, 2)),
  71: (
    (64, 128, 2),
    (128, 256, 1),
    (256, 256, 2),
    (256, 728, 1),
    (728, 728, 2),
  ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class XceptionConfig:
  """Hyper-parameters of an aligned Xception."""

  depth: int = 65
  output_stride: int = 16
  middle_blocks: int = 16
  width_divisor: int = 1  # tiny test variants divide every width

  def block_table(self) -> list[dict]:
    """Per block: in/out channels, stride and flags, as timm lays it out."""
    if self.depth not in _ENTRY:
      raise ValueError(f'Xception depth must be 65 or 71, got {self.depth}')
    d = self.width_divisor
    table = [
      dict(cin=i // d, couts=(o // d,) * 3, stride=s)
      for i, o, s in _ENTRY[self.depth]
    ]
    table += [
      dict(cin=728 // d, couts=(728 // d,) * 3, stride=1)
    ] * self.middle_blocks
    table.append(
      dict(cin=728 // d, couts=(728 // d, 1024 // d, 1024 // d), stride=2)
    )
    table.append(
      dict(
        cin=1024 // d,
        couts=(1536 // d, 1536 // d, 2048 // d),
        stride=1,
        no_skip=True,
        start_with_relu=False,
      )
    )
    return table


class XceptionBlock(nnx.Module):
  """Three separable convs (the last strided) with a residual connection.

  `start_with_relu` blocks apply ReLU before each separable conv (and none
  inside it); the last block instead has BN + ReLU inside its separable
  convs and no residual.
  """

  def __init__(
    self,
    cin: int,
    couts: tuple[int, int, int],
    *,
    stride: int,
    dilation: int,
    no_skip: bool = False,
    start_with_relu: bool = True,
    rngs: nnx.Rngs,
  ):
    chans = (cin, *couts)
    convs = [
      layers.SeparableConvBN(
        chans[i],
        chans[i + 1],
        3,
        stride=stride if i == 2 else 1,
        dilation=dilation,
        relu=not start_with_relu,
        epsilon=BN_EPS,
        rngs=rngs,
      )
      for i in range(3)
    ]
    self.conv1, self.conv2, self.conv3 = convs
    needs_projection = not no_skip and (couts[-1] != cin or stride != 1)
    self.shortcut = (
      layers.ConvBN(
        cin,
        couts[-1],
        1,
        stride=stride,
        activation='none',
        epsilon=BN_EPS,
        rngs=rngs,
      )
      if needs_projection
      else None
    )
    self.no_skip = no_skip
    self.start_with_relu = start_with_relu

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the block output and the tap (input of the last conv)."""
    act = jax.nn.relu if self.start_with_relu else (lambda y: y)
    y = self.conv1(act(x))
    tap = act(self.conv2(act(y)))
    y = self.conv3(tap)
    if not self.no_skip:
      y = y + (x if self.shortcut is None else self.shortcut(x))
    return y, tap


class Xception(layers.RematBlocks, nnx.Module):
  """Aligned Xception; returns `{'layer1': stride-4 low-level, 'out': last}`."""

  def __init__(self, config: XceptionConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.width_divisor
    self.stem = nnx.List(
      [
        layers.ConvBN(3, 32 // d, 3, stride=2, epsilon=BN_EPS, rngs=rngs),
        layers.ConvBN(32 // d, 64 // d, 3, epsilon=BN_EPS, rngs=rngs),
      ]
    )
    blocks, stride, dilation, tap = [], 2, 1, None
    for i, spec in enumerate(config.block_table()):
      spec = dict(spec)
      block_dilation = dilation
      if spec['stride'] > 1:
        if stride == 4 and tap is None:
          tap = i
        if stride * spec['stride'] > config.output_stride:
          dilation *= spec['stride']
          spec['stride'] = 1
        else:
          stride *= spec['stride']
      blocks.append(XceptionBlock(**spec, dilation=block_dilation, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.low_level_block = tap
    self.low_level_channels = config.block_table()[tap]['couts'][1]
    self.out_channels = 2048 // d
    if config.output_stride not in (8, 16, 32):
      raise ValueError(
        f'output_stride must be 8, 16 or 32, got {config.output_stride}'
      )

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    for conv in self.stem:
      x = conv(x)
    feats = {}
    for i, block in enumerate(self.blocks):
      x, tap = self.block(block, x)
      if i == self.low_level_block:
        feats['layer1'] = tap
    feats['out'] = x
    return feats
