r"""DeepLabV3+-ResNet101 on ADE20K (SceneParse150), mmsegmentation 160k recipe.

  python -m scripts.build_dataset --dataset ade20k --manual_dir ~/ade
  python -m scripts.train --config configs/ade20k_deeplabv3plus.py --workdir runs/ade_dlv3p

Output stride 8, 512x512 crops (scale 0.5-2.0), photometric jitter, SGD
lr 0.01, weight decay 5e-4, poly 0.9, batch 16, 160k steps, aux loss 0.4
(mmsegmentation `deeplabv3plus_r101-d8_4xb4-160k_ade20k-512x512`).
Validation images vary in size; they are padded to 512x2048 here (exact
multi-size evaluation belongs to scripts.evaluate).
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
  c.data.dataset = 'ade20k'
  c.data.crop_size = (512, 512)
  c.data.photometric = True
  c.data.num_workers = 8
  c.data.eval_pad_to = (2048, 2048)
  c.optim.name = 'sgd'
  c.optim.lr = 0.01
  c.optim.weight_decay = 5e-4
  c.loss.aux_weight = 0.4
  c.train.num_steps = 160_000
  c.train.batch_size = 16
  c.train.log_every_steps = 50
  c.eval.every_steps = 16_000
  c.eval.batch_size = 8
  c.checkpoint.every_steps = 4_000
  if arg == 'smoke':
    defaults.smoke(c, 'deeplabv3plus_resnet_tiny')
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; known: smoke')
  c.lock()
  return c
