"""PyTorch helpers for parity tests: random BN statistics, NCHW<->NHWC."""

import numpy as np
import torch


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
  """Non-trivial BN affine weights and running statistics, so a converter
  that drops or swaps them cannot pass."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=gen))
        m.bias.copy_(0.4 * torch.rand(n, generator=gen) - 0.2)
        m.running_mean.copy_(0.5 * torch.rand(n, generator=gen) - 0.25)
        m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def dilate_densenet(model):
  """Applies the DenseASPP OS8 recipe to a torchvision (or timm) DenseNet in
  place: no pooling in transitions 2 and 3, block 3 dilated 2, block 4
  dilated 4."""
  f = model.features
  f.transition2.pool = torch.nn.Identity()
  f.transition3.pool = torch.nn.Identity()
  for block, d in ((f.denseblock3, 2), (f.denseblock4, 4)):
    for layer in block.values():
      layer.conv2.dilation, layer.conv2.padding = (d, d), (d, d)
  return model
