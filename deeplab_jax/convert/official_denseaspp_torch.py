"""The official DenseASPP and MobileNetDenseASPP layouts in PyTorch, as
parity references.

Needs PyTorch (the `test` extra); used by the parity tests and
`scripts.benchmark --torch`, never imported by the rest of the package.
Written from the paper (Yang et al., CVPR 2018) and the layout
description of the official code: DenseNet with dilated blocks 3/4, a
transition 4, norm5, five densely connected atrous blocks and a x8
bilinear classifier.

Modern PyTorch forbids dots in module names, so the modules are named
`norm1`, `conv1`, ... and `official_state_dict` renames the keys to the
official checkpoint's `norm.1`, `conv.1`, ... form.
"""

import re

import torch
from torch import nn


class DenseLayer(nn.Module):
  def __init__(self, cin, growth, bn_size, dilation):
    super().__init__()
    mid = bn_size * growth
    self.norm1 = nn.BatchNorm2d(cin)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(mid)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(
      mid, growth, 3, padding=dilation, dilation=dilation, bias=False
    )

  def forward(self, x):
    y = self.conv1(self.relu1(self.norm1(x)))
    y = self.conv2(self.relu2(self.norm2(y)))
    return torch.cat([x, y], 1)


class Transition(nn.Sequential):
  def __init__(self, cin, cout, pool):
    super().__init__()
    self.add_module('norm', nn.BatchNorm2d(cin))
    self.add_module('relu', nn.ReLU(inplace=True))
    self.add_module('conv', nn.Conv2d(cin, cout, 1, bias=False))
    if pool:
      self.add_module('pool', nn.AvgPool2d(2, 2))


class AsppBlock(nn.Module):
  def __init__(self, cin, d0, d1, rate, bn_start):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(cin, momentum=0.0003) if bn_start else None
    # In place, as the official block: on the first block (no BN) this
    # overwrites the backbone features that are later concatenated.
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(cin, d0, 1)
    self.norm2 = nn.BatchNorm2d(d0, momentum=0.0003)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(d0, d1, 3, padding=rate, dilation=rate)
    self.drop = nn.Dropout2d(0.1)

  def forward(self, x):
    y = self.norm1(x) if self.norm1 is not None else x
    y = self.conv1(self.relu1(y))
    return self.drop(self.conv2(self.relu2(self.norm2(y))))


class OfficialHead(nn.Module):
  """The head both official models share: five densely connected atrous
  blocks (attributes `ASPP_3` ... `ASPP_24`) and the x8 classifier."""

  RATES = (3, 6, 12, 18, 24)

  def add_head(self, c, d0, d1, n_class):
    for k, rate in enumerate(self.RATES):
      setattr(self, f'ASPP_{rate}', AsppBlock(c + k * d1, d0, d1, rate, k > 0))
    c += len(self.RATES) * d1
    self.classification = nn.Sequential(
      nn.Dropout2d(0.1),
      nn.Conv2d(c, n_class, 1),
      nn.Upsample(scale_factor=8, mode='bilinear', align_corners=True),
    )

  def head(self, f):
    for rate in self.RATES:
      f = torch.cat([getattr(self, f'ASPP_{rate}')(f), f], 1)
    return self.classification(f)


class OfficialDenseASPP(OfficialHead):
  def __init__(self, growth, stem, blocks, d0, d1, n_class, output_stride=8):
    super().__init__()
    fs = output_stride // 8
    self.features = nn.Sequential()
    self.features.add_module('conv0', nn.Conv2d(3, stem, 7, 2, 3, bias=False))
    self.features.add_module('norm0', nn.BatchNorm2d(stem))
    self.features.add_module('relu0', nn.ReLU(inplace=True))
    self.features.add_module('pool0', nn.MaxPool2d(3, 2, 1))
    c = stem
    dilations = (1, 1, 2 // fs, 4 // fs)
    pools = (True, fs == 2, False, False)
    for i, n in enumerate(blocks):
      block = nn.Sequential()
      for j in range(n):
        block.add_module(
          f'denselayer{j + 1}',
          DenseLayer(c + j * growth, growth, 4, dilations[i]),
        )
      self.features.add_module(f'denseblock{i + 1}', block)
      c += n * growth
      self.features.add_module(
        f'transition{i + 1}', Transition(c, c // 2, pools[i])
      )
      c //= 2
    self.features.add_module('norm5', nn.BatchNorm2d(c))
    if fs > 1:
      self.features.add_module(
        'upsample',
        nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
      )
    self.add_head(c, d0, d1, n_class)

  def forward(self, x):
    return self.head(self.features(x))


class MobileNetV2Block(nn.Module):
  """The official dilated MobileNetV2 block: expansion (always), depthwise,
  linear projection, each conv-BN, ReLU6 after the first two."""

  def __init__(self, cin, cout, stride, t, dilation):
    super().__init__()
    e = cin * t
    self.residual = stride == 1 and cin == cout
    self.conv = nn.Sequential(
      nn.Conv2d(cin, e, 1, bias=False),
      nn.BatchNorm2d(e),
      nn.ReLU6(inplace=True),
      nn.Conv2d(e, e, 3, stride, dilation, dilation, groups=e, bias=False),
      nn.BatchNorm2d(e),
      nn.ReLU6(inplace=True),
      nn.Conv2d(e, cout, 1, bias=False),
      nn.BatchNorm2d(cout),
    )

  def forward(self, x):
    return x + self.conv(x) if self.residual else self.conv(x)


class OfficialMobileNetDenseASPP(OfficialHead):
  """`models/MobileNetDenseASPP.py` of the official repository: the dilated
  MobileNetV2 (`features.features`), DenseASPP blocks and the x8 classifier.
  At output stride 16 the official model's x2 feature upsample is
  registered where its forward never calls it; so here too."""

  def __init__(self, n_class, output_stride=8, d0=128, d1=64):
    super().__init__()
    scale = output_stride // 8
    stages = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, scale))
    stages += ((6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1))
    layers = [
      nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
      )
    ]
    c = 32
    for i, (t, cout, n, s) in enumerate(stages):
      d = 2 // scale if i >= 3 else 1
      for j in range(n):
        layers.append(MobileNetV2Block(c, cout, s if j == 0 else 1, t, d))
        c = cout
    self.features = nn.Module()
    self.features.features = nn.Sequential(*layers)
    self.add_head(c, d0, d1, n_class)

  def forward(self, x):
    return self.head(self.features.features(x))


def official_state_dict(model):
  """Keys as the official checkpoints write them (`norm.1`, `conv.2`)."""
  return {
    re.sub(r'\.(norm|relu|conv)([12])\.', r'.\1.\2.', k): v
    for k, v in model.state_dict().items()
  }
