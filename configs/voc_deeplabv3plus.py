r"""DeepLabV3+-ResNet101 on Pascal VOC 2012 + SBD (train_aug), 40k steps.

  python -m scripts.build_dataset --dataset voc_aug --manual_dir ~/voc
  python -m scripts.train --config configs/voc_deeplabv3plus.py --workdir runs/voc_dlv3p

mmsegmentation's `deeplabv3plus_r101-d8_4xb4-40k_voc12aug-512x512`: output
stride 8, 512x512 crops (scale 0.5-2.0), photometric jitter, SGD lr 0.01,
weight decay 5e-4, poly 0.9, batch 16, 40k steps, aux loss 0.4.
Weights: `hf-hub:timm/resnet101.tv_in1k`, torchvision's ImageNet
ResNet-101 (mmsegmentation's `open-mmlab://resnet101_v1c` is a deep-stem
ResNet this architecture does not have).
`:smoke` = tiny DeepLabV3+ on synthetic data, a few steps.
"""

from deeplab_jax import defaults


def get_config(arg: str | None = None):
  c = defaults.get_base_config()
  c.model.arch = 'deeplabv3plus_resnet101'
  c.model.init_from = 'hf-hub:timm/resnet101.tv_in1k'
  c.model.options.output_stride = 8
  c.model.options.aux_head = True
  c.data.dataset = 'voc_aug'
  c.data.crop_size = (512, 512)
  c.data.photometric = True
  c.data.num_workers = 8
  c.data.eval_pad_to = (512, 512)
  c.optim.name = 'sgd'
  c.optim.lr = 0.01
  c.optim.weight_decay = 5e-4
  c.loss.aux_weight = 0.4
  c.train.num_steps = 40_000
  c.train.batch_size = 16
  c.train.log_every_steps = 50
  c.eval.every_steps = 4_000
  c.checkpoint.every_steps = 2_000
  if arg == 'smoke':
    defaults.smoke(c, 'deeplabv3plus_resnet_tiny')
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; known: smoke')
  c.lock()
  return c
