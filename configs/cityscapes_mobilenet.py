r"""LR-ASPP on MobileNetV3-Large on Cityscapes: the fast mobile model.

  python -m scripts.train --config configs/cityscapes_mobilenet.py --workdir runs/lraspp_mnv3

Optimizer as torchvision's reference recipe for `lraspp_mobilenet_v3_large`
(pytorch/vision references/segmentation/README.md: `-b 4` on 8 GPUs,
`--wd 0.000001`; train.py's defaults: SGD momentum 0.9, lr 0.01, poly
power 0.9): global batch 32, weight decay 1e-6. The crop (512x1024) and
the length (80 epochs of the 2,975 fine images, 80 * 2975 / 32 = 7,437
steps) are this recipe's own choices for Cityscapes, as in the DenseASPP
recipe. `--config.model.arch=deeplabv3_mobilenet_v3_large` with
`--config.model.options.aux_head=True --config.loss.aux_weight=0.5` is
torchvision's DeepLabV3 variant (`--aux-loss`, weight 0.5).
Weights: `torchvision:mobilenet_v3_large` (IMAGENET1K_V1), the default
`weights_backbone` of torchvision's `lraspp_mobilenet_v3_large` and
`deeplabv3_mobilenet_v3_large` (torchvision/models/segmentation/); a
PyTorch file, so reading it needs PyTorch.
`:smoke` = the same model on synthetic data, a few steps.
"""

from deeplab_jax import defaults


def get_config(arg: str | None = None):
  c = defaults.get_base_config()
  c.model.arch = 'lraspp_mobilenet_v3_large'
  c.model.init_from = 'torchvision:mobilenet_v3_large'
  c.data.dataset = 'cityscapes'
  c.data.crop_size = (512, 1024)
  c.data.num_workers = 8
  c.data.eval_pad_to = (1024, 2048)
  c.optim.name = 'sgd'
  c.optim.lr = 0.01
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-6
  c.train.num_steps = 80 * 2975 // 32
  c.train.batch_size = 32
  c.train.log_every_steps = 50
  c.eval.every_steps = 744  # every 8 epochs
  c.checkpoint.every_steps = 500
  if arg == 'smoke':
    defaults.smoke(c, 'lraspp_mobilenet_v3_large')
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; known: smoke')
  c.lock()
  return c
