r"""DenseASPP-161 on Cityscapes (Yang et al., CVPR 2018): the main job.

  python -m scripts.build_dataset --dataset cityscapes --manual_dir ~/cityscapes
  python -m scripts.train --config configs/cityscapes_denseaspp.py --workdir runs/denseaspp161

Recipe as reported for the paper's Cityscapes model: dilated DenseNet-161 at
output stride 8, Adam (lr 3e-4, weight decay 1e-5), poly decay, batch 8,
512x512 random crops, 80 epochs of the 2,975 fine training images
(80 * 2975 / 8 = 29,750 steps), ImageNet-initialised backbone. The
official model reaches 79.9 mIoU on val (80.6 multi-scale).
Weights: `hf-hub:timm/densenet161.tv_in1k`, timm's safetensors copy of
torchvision's ImageNet DenseNet-161 (the official model's layer names are
torchvision's DenseNet layout; timm's pretrained config gives the tag,
Apache-2.0, ImageNet mean/std). Downloaded once into the Hugging Face
cache; `--config.model.init_from=` starts from random weights.
`:fullres` = whole 1024x2048 images instead of crops (random scale, flip),
each image's height split over 4 devices (`mesh.shape=(-1, 4)`; batch 8 =
2 images per data-axis slot on 16 devices; docs/distributed.md, "Splitting
images over devices");
`:smoke` = tiny DenseASPP on synthetic data, a few steps;
`:cityscapes_smoke` = the same model on a prepared Cityscapes (tests run it
on generated zips in the official layout).
"""

from deeplab_jax import defaults


def get_config(arg: str | None = None):
  c = defaults.get_base_config()
  c.model.arch = 'denseaspp161'
  c.model.init_from = 'hf-hub:timm/densenet161.tv_in1k'
  c.model.options.output_stride = 8
  c.data.dataset = 'cityscapes'
  c.data.crop_size = (512, 512)
  c.data.scale_range = (0.5, 2.0)
  c.data.num_workers = 8
  c.data.eval_pad_to = (1024, 2048)
  c.optim.name = 'adam'
  c.optim.lr = 3e-4
  c.optim.weight_decay = 1e-5
  c.train.num_steps = 29_750
  c.train.batch_size = 8
  c.train.log_every_steps = 50
  c.eval.every_steps = 2_975  # every 8 epochs
  c.eval.batch_size = 8
  c.checkpoint.every_steps = 1_000
  if arg == 'fullres':
    c.data.crop_size = (1024, 2048)
    c.mesh.shape = (-1, 4)
  if arg in ('smoke', 'cityscapes_smoke'):
    defaults.smoke(c, 'denseaspp_tiny')
  if arg == 'cityscapes_smoke':
    # The main job's input path (the Cityscapes builder's data through
    # Grain) on a small prepared copy, e.g. generated zips in CI.
    c.data.dataset = 'cityscapes'
    c.data.crop_size = (64, 64)
    c.train.num_steps = 4
    c.eval.every_steps = 4
    c.checkpoint.every_steps = 4
  elif arg not in (None, 'smoke', 'fullres'):
    raise ValueError(
      f'unknown variant {arg!r}; known: fullres, smoke, cityscapes_smoke'
    )
  c.lock()
  return c
