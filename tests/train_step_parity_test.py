"""One training step of a converted torchvision DeepLabV3 equals PyTorch's.

With frozen BatchNorm (`model.freeze_bn`, PyTorch `eval()` BN): train-mode
BN on a batch of two makes the image-pooling branch's BN (two values per
channel) so ill-conditioned that PyTorch's own float32 and float64
gradients differ widely, so that setting cannot pin anything down.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torchvision.models.segmentation import deeplabv3_resnet50

from deeplab_jax import defaults, models, steps
from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.data import normalization
from deeplab_jax.step_options import StepOptions
from tests.torch_refs import nchw, randomize_batchnorm, rel_err

LR, MOMENTUM, WD, AUX = 0.01, 0.9, 1e-4, 0.4


@pytest.mark.slow
def test_sgd_step_matches_pytorch(parity_report):
  torch.manual_seed(0)
  tm = deeplabv3_resnet50(
    weights=None, weights_backbone=None, num_classes=5, aux_loss=True
  )
  randomize_batchnorm(tm, 0)
  for m in tm.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0  # dropout draws differ between frameworks
  model = torch_convert.load('deeplabv3_resnet50', tm.state_dict())
  before_sd = {k: v.numpy().copy() for k, v in tm.state_dict().items()}
  rng = np.random.RandomState(0)
  # The train step takes uint8 pixels and normalises them on the device;
  # PyTorch gets the same pixels normalised on the host.
  c = defaults.get_base_config()
  pixels = rng.randint(0, 256, (2, 65, 73, 3)).astype(np.uint8)
  x = normalization.normalize(pixels, c.data.mean, c.data.std)
  y = rng.randint(0, 5, (2, 65, 73))
  y[:, :5] = 255

  # PyTorch: weight decay on conv kernels only, as our optimizer masks it.
  tm.eval()  # BN uses running statistics; gradients still flow
  decay = [p for p in tm.parameters() if p.ndim > 1]
  no_decay = [p for p in tm.parameters() if p.ndim <= 1]
  opt = torch.optim.SGD(
    [
      {'params': decay, 'weight_decay': WD},
      {'params': no_decay, 'weight_decay': 0.0},
    ],
    lr=LR,
    momentum=MOMENTUM,
  )
  out = tm(nchw(x))
  target = torch.from_numpy(y)
  loss_t = F.cross_entropy(
    out['out'], target, ignore_index=255
  ) + AUX * F.cross_entropy(out['aux'], target, ignore_index=255)
  opt.zero_grad()
  loss_t.backward()
  opt.step()

  c.optim.name, c.optim.lr = 'sgd', LR
  c.optim.momentum, c.optim.weight_decay = MOMENTUM, WD
  c.loss.aux_weight = AUX
  c.train.num_steps = 100
  c.model.freeze_bn = True
  # As training on this host's CPU devices views it (programs.training_view).
  model = nnx.view(
    models.platform_view(model, 'cpu'),
    deterministic=True,
    use_running_average=True,
  )
  graph, params, stats = steps.split_model(model)
  options = StepOptions.from_config(c, graph)
  step = functools.partial(steps.train_step, options=options)
  state = steps.initial_state(params, stats, options)
  new, logs = jax.jit(step)(
    state, {'image': jnp.asarray(pixels), 'label': jnp.asarray(y, jnp.uint8)}
  )
  np.testing.assert_allclose(logs['loss'], loss_t.item(), rtol=1e-5)

  got = new.params
  pairs = {
    'backbone.conv1.weight': got['backbone']['conv1']['kernel'],
    'backbone.layer4.2.conv3.weight': got['backbone']['layer4'][2]['conv3'][
      'kernel'
    ],
    'classifier.4.weight': got['head']['classifier']['kernel'],
    'classifier.4.bias': got['head']['classifier']['bias'],
    'backbone.bn1.weight': got['backbone']['bn1']['scale'],
    'aux_classifier.4.weight': got['aux_head']['classifier']['kernel'],
  }
  sd = tm.state_dict()
  for name, ours in pairs.items():
    ref, old = sd[name].numpy(), before_sd[name]
    if ref.ndim == 4:
      ref, old = ref.transpose(2, 3, 1, 0), old.transpose(2, 3, 1, 0)
    assert rel_err(ours, ref) < 1e-4, name
    # The update itself, not only the (mostly unchanged) weights.
    delta_ref = ref - old
    assert np.abs(delta_ref).max() > 0, name
    # float32 noise grows through 50 layers of backward (~3e-3 at conv1).
    update_err = rel_err(np.asarray(ours) - old, delta_ref)
    parity_report(
      'One SGD step of DeepLabV3-R50 against PyTorch (frozen BN, aux 0.4)',
      tensor=name,
      weights=rel_err(ours, ref),
      update=update_err,
    )
    assert update_err < 1e-2, name
  # Frozen statistics stay exactly as they were.
  np.testing.assert_array_equal(
    new.batch_stats['backbone']['layer1'][0]['bn1']['mean'],
    before_sd['backbone.layer1.0.bn1.running_mean'],
  )
