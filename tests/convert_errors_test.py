"""Bad conversions are refused with the keys and shapes named."""

import numpy as np
import pytest
import torch
from torchvision.models import resnet18, squeezenet1_0
from torchvision.models.segmentation import deeplabv3_resnet50

from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.errors import CheckpointMismatchError, ConfigError


@pytest.fixture(scope='module')
def r50_state():
  torch.manual_seed(0)
  model = deeplabv3_resnet50(
    weights=None, weights_backbone=None, num_classes=5, aux_loss=False
  )
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _synthetic_r101_state(r50_state):
  """A ResNet-101-shaped state dict: layer3 with 23 blocks (values are not
  needed to test the key check)."""
  sd = dict(r50_state)
  block = {
    k.split('layer3.5.', 1)[1]: v
    for k, v in sd.items()
    if k.startswith('backbone.layer3.5.')
  }
  for i in range(6, 23):
    for leaf, v in block.items():
      sd[f'backbone.layer3.{i}.{leaf}'] = v
  return sd


def test_unknown_arch(r50_state):
  with pytest.raises(ConfigError, match='unknown arch.*Known:'):
    torch_convert.load('deeplab_resnet50', r50_state)


def test_resnet101_state_dict_as_resnet50_names_unexpected_keys(r50_state):
  sd = _synthetic_r101_state(r50_state)
  with pytest.raises(CheckpointMismatchError) as e:
    torch_convert.load('deeplabv3_resnet50', sd)
  msg = str(e.value)
  assert 'looks like deeplabv3_resnet101' in msg
  assert 'unexpected' in msg and 'backbone.layer3.6.conv1.weight' in msg
  assert '\n' not in msg


def test_truncated_state_dict_names_missing_keys(r50_state):
  sd = {
    k: v for k, v in r50_state.items() if not k.startswith('backbone.layer4.2.')
  }
  with pytest.raises(CheckpointMismatchError, match=r'missing.*layer4\.2\.'):
    torch_convert.load('deeplabv3_resnet50', sd)


def test_wrong_num_classes_names_shape(r50_state):
  with pytest.raises(CheckpointMismatchError) as e:
    torch_convert.load('deeplabv3_resnet50', r50_state, num_classes=19)
  msg = str(e.value)
  assert 'classifier.4.weight (5, 256, 1, 1)' in msg
  assert '(1, 1, 256, 19)' in msg


def test_model_of_another_family_is_refused():
  sd = squeezenet1_0(weights=None).state_dict()
  with pytest.raises(CheckpointMismatchError, match='unrecognised state dict'):
    torch_convert.load('deeplabv3_resnet50', sd)
  # An ImageNet ResNet of basic blocks: the layout is known, the blocks
  # are not the bottlenecks of ResNet-50.
  sd = resnet18(weights=None).state_dict()
  with pytest.raises(CheckpointMismatchError) as e:
    torch_convert.load('deeplabv3_resnet50', sd, num_classes=19)
  assert 'torchvision_resnet state dict does not fit deeplabv3_resnet50' in (
    str(e.value)
  )
  assert 'missing' in str(e.value)


def test_module_prefix_and_wrapper_are_accepted(r50_state):
  wrapped = {
    'state_dict': {f'module.{k}': v for k, v in r50_state.items()},
    'epoch': 3,
  }
  model = torch_convert.load('deeplabv3_resnet50', wrapped)
  np.testing.assert_array_equal(
    model.head.classifier.bias[...], r50_state['classifier.4.bias']
  )
  np.testing.assert_array_equal(
    model.backbone.conv1.kernel[...],
    r50_state['backbone.conv1.weight'].transpose(2, 3, 1, 0),
  )
