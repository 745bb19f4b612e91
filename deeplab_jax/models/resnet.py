"""Atrous ResNet-50/101/152 (bottleneck, torchvision layout).

Output stride 8, 16 or 32 replaces the strides of the last stages with
dilation exactly as torchvision's `replace_stride_with_dilation` does: the
first block of a dilated stage keeps the previous dilation, the others use
the new one. `multi_grid` applies the DeepLabV3 paper's unit rates to the
blocks of the last stage (Chen et al. 2017, sec. 3.2: rates `r * grid[i]`).

Attribute names follow torchvision (`conv1`, `bn1`, `layer1.0.conv2`,
`downsample.conv`), so converting torchvision, timm or smp ResNets is a key
rename.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from deeplab_jax.models import layers

DEPTHS = {
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNetConfig:
  """Hyper-parameters of an atrous bottleneck ResNet."""

  blocks: tuple[int, ...] = DEPTHS[50]
  width: int = 64  # stem width; stage widths are width * (1, 2, 4, 8)
  output_stride: int = 8
  multi_grid: tuple[int, ...] | None = None
  # False: torchvision (a dilated stage's first block keeps the previous
  # dilation). True: every block of the stage uses the new one
  # (segmentation_models_pytorch's `make_dilated`).
  uniform_dilation: bool = False

  def stage_strides_and_dilations(self) -> list[tuple[int, int, int]]:
    """`(stride, first_block_dilation, dilation)` per stage (torchvision)."""
    if self.output_stride not in (8, 16, 32):
      raise ValueError(
        f'output_stride must be 8, 16 or 32, got {self.output_stride}'
      )
    dilate = {8: (False, True, True), 16: (False, False, True)}.get(
      self.output_stride, (False, False, False)
    )
    plan, dilation = [(1, 1, 1)], 1
    for replace in dilate:
      previous, stride = dilation, 2
      if replace:
        dilation *= stride
        stride = 1
      first = dilation if self.uniform_dilation else previous
      plan.append((stride, first, dilation))
    return plan


class Bottleneck(nnx.Module):
  """torchvision's Bottleneck: 1x1, 3x3 (stride, dilation), 1x1, residual."""

  expansion = 4

  def __init__(
    self,
    inplanes: int,
    planes: int,
    *,
    stride: int,
    dilation: int,
    rngs: nnx.Rngs,
  ):
    out = planes * self.expansion
    self.conv1 = layers.Conv2d(inplanes, planes, 1, rngs=rngs)
    self.bn1 = layers.BatchNorm(planes)
    self.conv2 = layers.Conv2d(
      planes, planes, 3, stride=stride, dilation=dilation, rngs=rngs
    )
    self.bn2 = layers.BatchNorm(planes)
    self.conv3 = layers.Conv2d(planes, out, 1, rngs=rngs)
    self.bn3 = layers.BatchNorm(out)
    needs_projection = stride != 1 or inplanes != out
    self.downsample = (
      layers.ConvBN(
        inplanes, out, 1, stride=stride, activation='none', rngs=rngs
      )
      if needs_projection
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class ResNet(layers.RematBlocks, nnx.Module):
  """Atrous ResNet returning the feature maps the heads need.

  Returns a dict: `layer1` (stride 4, the DeepLabV3+ low-level features),
  `layer2` (stride 8), `layer3` (input of the auxiliary head) and `layer4`.
  """

  def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    w = config.width
    self.conv1 = layers.Conv2d(3, w, 7, stride=2, padding=3, rngs=rngs)
    self.bn1 = layers.BatchNorm(w)
    plan = config.stage_strides_and_dilations()
    inplanes = w
    stages = []
    for i, (n, (stride, first_d, d)) in enumerate(
      zip(config.blocks, plan, strict=True)
    ):
      planes = w * 2**i
      dilations = [first_d] + [d] * (n - 1)
      if i == len(config.blocks) - 1 and config.multi_grid is not None:
        if len(config.multi_grid) != n:
          raise ValueError(
            f'multi_grid {config.multi_grid} needs one rate per block of the'
            f' last stage ({n} blocks)'
          )
        dilations = [d * g for g in config.multi_grid]
      blocks = []
      for j, dil in enumerate(dilations):
        blocks.append(
          Bottleneck(
            inplanes,
            planes,
            stride=stride if j == 0 else 1,
            dilation=dil,
            rngs=rngs,
          )
        )
        inplanes = planes * Bottleneck.expansion
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.out_channels = inplanes

  def channels(self) -> dict[str, int]:
    """Channels of each returned feature map."""
    w = self.config.width * Bottleneck.expansion
    return {f'layer{i + 1}': w * 2**i for i in range(4)}

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = layers.max_pool(x, 3, 2, 1)
    feats = {}
    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
      x = self.stage(getattr(self, name), x)
      feats[name] = x
    return feats
