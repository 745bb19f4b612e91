r"""DeepLabV3+-Xception65 on Cityscapes, mmsegmentation-style 80k recipe.

  python -m scripts.train --config configs/cityscapes_deeplabv3plus.py --workdir runs/dlv3p_x65

Output stride 16 (the paper's training stride), separable ASPP and decoder,
SGD momentum 0.9, lr 0.01, weight decay 5e-4, poly 0.9, batch 8, 512x1024
crops, 80k steps. Weights: `hf-hub:timm/xception65.tf_in1k`, timm's port
of the TensorFlow DeepLab ImageNet Xception-65; its inputs are scaled to
[-1, 1] (timm's pretrained config: mean and std 0.5), so `data.mean` and
`data.std` are set to match. `:resnet101` swaps in the ResNet-101 backbone
(`hf-hub:timm/resnet101.tv_in1k`, ImageNet statistics) with the FCN
auxiliary head (loss weight 0.4).
`:smoke` = tiny Xception DeepLabV3+ on synthetic data, a few steps.
"""

from deeplab_jax import defaults
from deeplab_jax.data import normalization


def get_config(arg: str | None = None):
  c = defaults.get_base_config()
  c.model.arch = 'deeplabv3plus_xception65'
  c.model.init_from = 'hf-hub:timm/xception65.tf_in1k'
  c.data.mean, c.data.std = normalization.INCEPTION
  c.model.options.output_stride = 16
  c.data.dataset = 'cityscapes'
  c.data.crop_size = (512, 1024)
  c.data.num_workers = 8
  c.data.photometric = True
  c.data.eval_pad_to = (1024, 2048)
  c.optim.name = 'sgd'
  c.optim.lr = 0.01
  c.optim.weight_decay = 5e-4
  c.train.num_steps = 80_000
  c.train.batch_size = 8
  c.train.log_every_steps = 50
  c.eval.every_steps = 8_000
  c.checkpoint.every_steps = 2_000
  if arg == 'resnet101':
    c.model.arch = 'deeplabv3plus_resnet101'
    c.model.init_from = 'hf-hub:timm/resnet101.tv_in1k'
    c.data.mean, c.data.std = normalization.IMAGENET
    c.model.options.aux_head = True
    c.loss.aux_weight = 0.4
  elif arg == 'smoke':
    defaults.smoke(c, 'deeplabv3plus_xception_tiny')
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; known: resnet101, smoke')
  c.lock()
  return c
