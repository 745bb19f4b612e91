"""How each family's weights start, as its reference implementation does.

`Conv2d` starts with torchvision's backbone rule (Kaiming normal, fan-out,
ReLU gain). The references initialise their heads differently, and that
decides the first steps of every run: a fan-out rule on a classifier with
few outputs gives logits with a standard deviation of ~10 and a first loss
several times chance. `reinit_convs` re-draws every convolution of a
module with one of the rules below:

- torchvision segmentation heads (`DeepLabHead`, `FCNHead`): PyTorch's
  `nn.Conv2d` default, Kaiming uniform with a = sqrt(5), i.e. weights and
  biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
- segmentation_models_pytorch's DeepLabV3+ (`initialize_decoder`,
  `initialize_head`): decoder convs Kaiming uniform, fan-in, ReLU gain,
  bias 0; the classifier Xavier uniform, bias 0.
- the official DenseASPP (`models/DenseASPP.py`): every conv
  `nn.init.kaiming_uniform` (fan-in, gain sqrt(2)); biases keep PyTorch's
  default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

BatchNorm starts at scale 1, bias 0 in all of them, as ours does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from deeplab_jax.models import host_random, layers

# (key, kernel shape [kh, kw, C_in/groups, C_out]) -> kernel
KernelInit = Callable[[jax.Array, tuple[int, ...]], jax.Array]


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
  """PyTorch's fan-in and fan-out of a conv kernel (`C_in/groups` wide)."""
  kh, kw, cin, cout = shape
  return kh * kw * cin, kh * kw * cout


_uniform = host_random.uniform


def torch_default(key, shape):
  """`nn.Conv2d`'s default: U(+-1/sqrt(fan_in))."""
  return _uniform(key, shape, 1 / np.sqrt(_fans(shape)[0]))


def kaiming_uniform_fan_in(key, shape):
  """`kaiming_uniform_(mode='fan_in', nonlinearity='relu')`:
  U(+-sqrt(6 / fan_in))."""
  return _uniform(key, shape, np.sqrt(6 / _fans(shape)[0]))


def xavier_uniform(key, shape):
  """`xavier_uniform_`: U(+-sqrt(6 / (fan_in + fan_out)))."""
  fan_in, fan_out = _fans(shape)
  return _uniform(key, shape, np.sqrt(6 / (fan_in + fan_out)))


def reinit_convs(
  module: nnx.Module,
  key: jax.Array,
  kernel_init: KernelInit,
  *,
  torch_default_bias: bool,
) -> None:
  """Re-draws the kernel of every `Conv2d` in `module` with `kernel_init`,
  and its bias with PyTorch's default (`torch_default_bias`) or zeros."""
  convs = [m for _, m in nnx.iter_graph(module) if isinstance(m, layers.Conv2d)]
  for i, conv in enumerate(convs):
    k_kernel, k_bias = jax.random.split(jax.random.fold_in(key, i))
    shape = conv.kernel[...].shape
    conv.kernel[...] = kernel_init(k_kernel, shape)
    if conv.bias is not None:
      bound = 1 / np.sqrt(_fans(shape)[0]) if torch_default_bias else 0.0
      conv.bias[...] = _uniform(k_bias, (shape[-1],), bound)
