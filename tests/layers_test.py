"""Layers against PyTorch: BatchNorm, pooling, resize (the convolution
lowerings are in conv_lowering_test.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeplab_jax.models import layers
from tests.torch_refs import nchw, nhwc, randomize_batchnorm


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize(
  'in_hw,out_hw',
  [
    ((17, 23), (65, 97)),
    ((65, 97), (17, 23)),
    ((7, 5), (8, 13)),
    ((1, 1), (9, 4)),
    ((33, 31), (33, 60)),
  ],
)
def test_resize_matches_torch_interpolate(in_hw, out_hw, align_corners):
  x = np.random.RandomState(0).randn(2, *in_hw, 3).astype(np.float32)
  ref = F.interpolate(
    nchw(x), size=out_hw, mode='bilinear', align_corners=align_corners
  )
  ours = layers.resize_bilinear(
    jnp.asarray(x), out_hw, align_corners=align_corners
  )
  assert ours.shape == (2, *out_hw, 3)
  np.testing.assert_allclose(ours, nhwc(ref), rtol=0, atol=2e-6)


def test_batchnorm_train_and_eval_match_torch():
  rng = np.random.RandomState(2)
  x = (3 * rng.randn(4, 5, 7, 6) + 1).astype(np.float32)
  tbn = torch.nn.BatchNorm2d(6)
  randomize_batchnorm(tbn, seed=3)
  ours = layers.BatchNorm(6)
  ours.scale[...] = jnp.asarray(tbn.weight.detach().numpy())
  ours.bias[...] = jnp.asarray(tbn.bias.detach().numpy())
  ours.mean[...] = jnp.asarray(tbn.running_mean.numpy())
  ours.var[...] = jnp.asarray(tbn.running_var.numpy())
  # Eval first (running stats untouched), then one training forward.
  tbn.eval()
  ours.use_running_average = True
  np.testing.assert_allclose(
    ours(jnp.asarray(x)), nhwc(tbn(nchw(x))), atol=2e-6
  )
  tbn.train()
  ours.use_running_average = False
  np.testing.assert_allclose(
    ours(jnp.asarray(x)), nhwc(tbn(nchw(x))), atol=2e-5
  )
  # PyTorch updates running_var with the unbiased batch variance.
  np.testing.assert_allclose(ours.mean[...], tbn.running_mean, atol=1e-6)
  np.testing.assert_allclose(ours.var[...], tbn.running_var, rtol=1e-5)


def test_max_pool_and_global_pool_match_torch():
  x = np.random.RandomState(4).randn(2, 13, 10, 3).astype(np.float32)
  ref = nhwc(F.max_pool2d(nchw(x), 3, 2, 1))
  np.testing.assert_array_equal(layers.max_pool(jnp.asarray(x), 3, 2, 1), ref)
  gap = nhwc(F.adaptive_avg_pool2d(nchw(x), 1))
  np.testing.assert_allclose(
    layers.global_avg_pool(jnp.asarray(x)), gap, atol=1e-6
  )
