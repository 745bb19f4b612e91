r"""DeepLabV3+ (tiny ResNet) on the synthetic shapes data set: the README demo.

  python -m scripts.train --config configs/synthetic_demo.py --workdir /tmp/demo

Needs no download (the data set is generated on first use) and reaches a
useful mIoU in a few minutes on 2 CPU cores. `:smoke` runs 10 steps of
`deeplabv3plus_resnet_tiny` at its registry widths (`defaults.smoke`).
"""

from deeplab_jax import defaults


def get_config(arg: str | None = None):
  c = defaults.get_base_config()
  c.model.arch = 'deeplabv3plus_resnet_tiny'
  c.model.options.aspp_channels = 32
  c.model.options.resnet_width = 16
  c.data.dataset = 'synthetic_shapes'
  c.data.crop_size = (96, 128)
  c.data.scale_range = (0.75, 1.5)
  c.optim.name = 'adam'
  c.optim.lr = 3e-3
  c.optim.weight_decay = 1e-5
  c.train.num_steps = 400
  c.train.batch_size = 8
  c.train.log_every_steps = 20
  c.eval.every_steps = 200
  c.eval.batch_size = 16
  c.checkpoint.every_steps = 100
  if arg == 'smoke':
    defaults.smoke(c, 'deeplabv3plus_resnet_tiny')
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; known: smoke')
  c.lock()
  return c
