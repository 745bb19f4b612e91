"""torchvision DeepLabV3 -> ours: logits parity in eval and train mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torchvision.models import segmentation as tv_seg

from deeplab_jax import models, predict
from deeplab_jax.convert import torch as torch_convert
from tests.torch_refs import nchw, nhwc, randomize_batchnorm, rel_err

TOL = 1e-4  # max |diff| / max |logit|, float32


def _torchvision(name: str, num_classes: int, seed: int):
  torch.manual_seed(seed)
  model = getattr(tv_seg, name)(
    weights=None,
    weights_backbone=None,
    num_classes=num_classes,
    aux_loss=True,
  )
  randomize_batchnorm(model, seed)
  return model.eval()


@pytest.fixture(scope='module')
def resnet50_pair():
  tm = _torchvision('deeplabv3_resnet50', 21, seed=0)
  return tm, torch_convert.load('deeplabv3_resnet50', tm.state_dict())


# Through this host's kernels (XLA:CPU's lowerings), as users on CPU run.
_eval_forward_jit = nnx.jit(lambda m, x: m(x))
_eval_forward = lambda m, x: _eval_forward_jit(
  models.platform_view(m, 'cpu'), x
)


@pytest.mark.slow
@pytest.mark.parametrize('hw', [(97, 129), (129, 65), (64, 80)])
def test_resnet50_eval_parity_main_and_aux(resnet50_pair, hw, parity_report):
  tm, model = resnet50_pair
  assert model.source_layout == 'torchvision_deeplabv3'
  assert model.config.aux_head and model.num_classes == 21
  x = np.random.RandomState(hw[0]).randn(2, *hw, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm(nchw(x))
  view = predict.inference_view(model)
  out = _eval_forward(view, jnp.asarray(x))
  main, aux = (rel_err(out[k], nhwc(ref[k])) for k in ('out', 'aux'))
  parity_report(
    'DeepLabV3, torchvision (eval, 21 classes, aux head)',
    model='deeplabv3_resnet50',
    input=f'2x{hw[0]}x{hw[1]}',
    out=main,
    aux=aux,
  )
  assert main < TOL and aux < TOL
  # The public inference API returns the same main logits.
  np.testing.assert_allclose(predict.logits(model, x), out['out'], atol=1e-5)


def test_resnet50_train_mode_parity_and_bn_updates(
  resnet50_pair, parity_report
):
  """Batch statistics forward and running-stat updates (dropout off)."""
  tm, model = resnet50_pair
  tm = _torchvision('deeplabv3_resnet50', 21, seed=0).train()
  for m in tm.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
  x = np.random.RandomState(7).randn(2, 65, 81, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm(nchw(x))
  train_view = nnx.view(models.platform_view(model, 'cpu'), deterministic=True)
  graphdef, state = nnx.split(train_view)

  @jax.jit
  def fwd(state, x):
    m = nnx.merge(graphdef, state)
    out = m(x)
    return out, nnx.state(m)

  out, new_state = fwd(state, jnp.asarray(x))
  main, aux = (rel_err(out[k], nhwc(ref[k])) for k in ('out', 'aux'))
  updated = nnx.merge(graphdef, new_state)
  bn = updated.backbone.layer4[2].bn3
  tbn = tm.backbone.layer4[2].bn3
  parity_report(
    'DeepLabV3, torchvision, training mode (batch statistics, dropout off)',
    model='deeplabv3_resnet50',
    input='2x65x81',
    out=main,
    aux=aux,
    layer4_bn3_running_mean=rel_err(bn.mean[...], tbn.running_mean),
    layer4_bn3_running_var=rel_err(bn.var[...], tbn.running_var),
  )
  assert main < TOL and aux < TOL
  np.testing.assert_allclose(
    bn.mean[...], tbn.running_mean, rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(bn.var[...], tbn.running_var, rtol=1e-4)


def test_resnet101_eval_parity(parity_report):
  tm = _torchvision('deeplabv3_resnet101', 19, seed=1)
  tm.aux_classifier = None  # checkpoints without the aux head convert too
  sd = tm.state_dict()
  assert not any(k.startswith('aux_classifier') for k in sd)
  model = torch_convert.load('deeplabv3_resnet101', sd)
  assert not model.config.aux_head
  x = np.random.RandomState(3).randn(1, 97, 129, 3).astype(np.float32)
  with torch.no_grad():
    ref = nhwc(tm(nchw(x))['out'])
  err = rel_err(predict.logits(model, x), ref)
  parity_report(
    'DeepLabV3, torchvision (eval, 19 classes, no aux head)',
    model='deeplabv3_resnet101',
    input='1x97x129',
    out=err,
  )
  assert err < TOL
