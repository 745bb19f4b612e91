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
