r"""DeepLabV3-ResNet101 on Cityscapes, mmsegmentation's 80k recipe.

  python -m scripts.train --config configs/cityscapes_deeplabv3.py --workdir runs/dlv3_r101

Output stride 8, SGD momentum 0.9, lr 0.01, weight decay 5e-4, poly 0.9,
batch 8, 512x1024 crops, 80k steps, FCN auxiliary head with loss weight 0.4
(mmsegmentation `deeplabv3_r101-d8_4xb2-80k_cityscapes-512x1024`).
Weights: `hf-hub:timm/resnet101.tv_in1k`, torchvision's ImageNet ResNet-101
(IMAGENET1K_V1; timm's pretrained config names its URL
resnet101-63fe2227.pth), the default `weights_backbone` of torchvision's
`deeplabv3_resnet101` (torchvision/models/segmentation/deeplabv3.py).
mmsegmentation starts from `open-mmlab://resnet101_v1c` instead
(configs/_base_/models/deeplabv3_r50-d8.py), a deep-stem ResNet this
architecture (torchvision's layout) does not have.
`:smoke` = tiny DeepLabV3 on synthetic data, a few steps.
"""

from deeplab_jax import defaults


def get_config(arg: str | None = None):
  c = defaults.get_base_config()
  c.model.arch = 'deeplabv3_resnet101'
  c.model.init_from = 'hf-hub:timm/resnet101.tv_in1k'
  c.model.options.output_stride = 8
  c.model.options.aux_head = True
  c.data.dataset = 'cityscapes'
  c.data.crop_size = (512, 1024)
  c.data.num_workers = 8
  c.data.photometric = True
  c.data.eval_pad_to = (1024, 2048)
  c.optim.name = 'sgd'
  c.optim.lr = 0.01
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.loss.aux_weight = 0.4
  c.train.num_steps = 80_000
  c.train.batch_size = 8
  c.train.log_every_steps = 50
  c.eval.every_steps = 8_000
  c.checkpoint.every_steps = 2_000
  if arg == 'smoke':
    defaults.smoke(c, 'deeplabv3_resnet_tiny')
    c.model.options.aux_head = True
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; known: smoke')
  c.lock()
  return c
