"""The PyTorch network each architecture is measured against, and the
options that build ours as the same network."""

from __future__ import annotations

from typing import Any

from deeplab_jax.convert import torch as torch_convert
from deeplab_jax.models import registry

# Archs whose reference has an FCN auxiliary head (torchvision's
# `aux_loss`), as ours (`aux_head`).
AUX_ARCHS = ('deeplabv3_resnet', 'deeplabv3_mobilenet')


def reference_overrides(arch: str, aux: bool = False) -> dict[str, Any]:
  """Options that make `arch` the same network as `torch_reference(arch)`.

  The `deeplabv3plus_*` archs default to the paper's layout (plain ASPP at
  6/12/18 for ResNets); their PyTorch reference is smp's `DeepLabV3Plus`
  with its defaults, so both frameworks are measured in smp's layout.
  `aux`: with the auxiliary head (`AUX_ARCHS` only).
  """
  if aux and not arch.startswith(AUX_ARCHS):
    raise ValueError(
      f'{arch}: its PyTorch reference has no auxiliary head (--aux is for '
      f'{", ".join(a + "*" for a in AUX_ARCHS)})'
    )
  if arch.startswith('deeplabv3plus_'):
    return torch_convert.smp_deeplabv3plus_options(resnet='resnet' in arch)
  if arch.startswith('denseaspp'):
    return {'align_corners': True}  # the official model's nn.Upsample
  return {'aux_head': True} if aux else {}


def torch_reference(arch: str, num_classes: int, aux: bool = False):
  """The PyTorch model `arch` is checked against (needs the test extra);
  `aux` as in `reference_overrides`."""
  reference_overrides(arch, aux)  # refuses `aux` where there is none
  if arch.startswith(('deeplabv3_resnet', 'deeplabv3_mobilenet', 'lraspp_')):
    from torchvision.models import segmentation

    if hasattr(segmentation, arch):  # not e.g. our tiny test variants
      extra = {'aux_loss': True} if aux else {}
      return getattr(segmentation, arch)(
        weights=None, weights_backbone=None, num_classes=num_classes, **extra
      )
  if arch.startswith('deeplabv3plus_'):
    import segmentation_models_pytorch as smp

    encoder = arch.removeprefix('deeplabv3plus_')
    encoder = 'tu-' + encoder if encoder.startswith('xception') else encoder
    return smp.DeepLabV3Plus(encoder, encoder_weights=None, classes=num_classes)
  if arch == 'denseaspp_mobilenet_v2':
    from deeplab_jax.convert import official_denseaspp_torch as official

    return official.OfficialMobileNetDenseASPP(num_classes)
  if arch.startswith('denseaspp'):
    from deeplab_jax.convert.official_denseaspp_torch import OfficialDenseASPP

    c = registry.make_config(arch)
    return OfficialDenseASPP(
      c.growth_rate, c.init_features, c.blocks, c.d0, c.d1, num_classes
    )
  raise ValueError(f'no PyTorch reference for {arch}')
