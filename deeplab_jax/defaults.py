"""Defaults shared by every recipe; recipes override what they change.

Every key listed in the README's config table exists in every recipe. The
returned config is locked by the recipe, so a mistyped override fails.
"""

import ml_collections
from ml_collections import config_dict

from deeplab_jax.data import normalization


def get_base_config() -> ml_collections.ConfigDict:
  """All keys with generic defaults (a short CPU run of a tiny model)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'deeplabv3plus_resnet_tiny'
  # '' = random init; a checkpoint dir (scripts.train / convert_torch) or a
  # PyTorch .pth (converted on the fly, backbone-only sources allowed).
  c.model.init_from = ''
  c.model.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU/TPU
  # Normalise with the running BN statistics and stop updating them (the
  # usual fine-tuning setting for small per-device batches at OS8); BN
  # scales and biases still train.
  c.model.freeze_bn = False
  # Recompute activations in the backward pass (less memory, more compute).
  c.model.remat = 'none'  # 'full': the whole forward; 'blocks': each block
  # Each run of identical ResNet / MobileNet blocks as one jax.lax.scan
  # (compiled once; slower on XLA:CPU, docs/benchmarks.md). DenseNet scans
  # its dense layers whatever this says. Checkpoints do not change.
  c.model.scan_blocks = False
  # How convolutions are computed (models.conv_lowering): 'auto' picks the
  # target platform's kernels; 'native' forces XLA's own convolutions
  # everywhere (a lever to measure against, e.g. with scripts.plan).
  c.model.conv_lowering = 'auto'
  # Architecture options passed to models.create (e.g. output_stride).
  c.model.options = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'synthetic_shapes'
  c.data.data_dir = '~/tensorflow_datasets'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.crop_size = (96, 128)
  c.data.scale_range = (0.5, 2.0)
  c.data.flip = True
  c.data.photometric = False
  c.data.num_workers = 0
  c.data.mean = normalization.IMAGENET[0]
  c.data.std = normalization.IMAGENET[1]
  c.data.eval_pad_to = config_dict.placeholder(tuple)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'
  c.optim.lr = 0.01
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.poly_power = 0.9
  c.optim.warmup_steps = 0
  c.optim.end_lr = 0.0
  c.optim.grad_accum_steps = 1
  c.optim.clip_grad_norm = 0.0
  c.optim.ema_decay = 0.0  # > 0 keeps an EMA of the weights for evaluation

  c.loss = ml_collections.ConfigDict()
  c.loss.aux_weight = 0.4
  c.loss.class_weights = config_dict.placeholder(tuple)
  c.loss.ohem_thresh = 0.0  # > 0 turns OHEM on
  c.loss.ohem_min_kept = 100_000

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.batch_size = 8  # global, over all devices and hosts
  c.train.log_every_steps = 10
  # Multi-process: a process whose step stays behind the others' this long
  # (they wait for it in a collective) hangs; every process then stops,
  # naming it. Compiles, evaluations and checkpoint writes hold every
  # process at one step and do not count.
  c.train.hang_timeout_s = 1800.0
  # A jax.profiler trace of these steps into WORKDIR/profile ('' none; '5',
  # '5-7'), each step's time logged beside the plan's estimate for the
  # same program when `profile_plan` names a `scripts.plan --output` file.
  c.train.profile_steps = ''
  c.train.profile_plan = ''

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500
  c.eval.batch_size = 8

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  # Resume from / init_from checkpoint steps that have no digests (written
  # before digests existed) instead of refusing them.
  c.checkpoint.allow_unverified = False

  c.mesh = ml_collections.ConfigDict()
  # (D,): ('data',) axis, -1 = every device; (D, S): each image's height
  # split over S devices of a host ('spatial' axis).
  c.mesh.shape = (-1,)
  # 'replicated', or 'fsdp': large parameters and optimizer state split over
  # the data axis (memory per device falls with the device count).
  c.mesh.param_sharding = 'replicated'
  return c


def smoke(c: ml_collections.ConfigDict, arch: str) -> ml_collections.ConfigDict:
  """The `:smoke` variant of any recipe: a tiny model on synthetic data,
  a few steps, for tests and CI."""
  c.model.arch = arch
  c.model.options = ml_collections.ConfigDict()
  c.model.init_from = ''
  c.data.dataset = 'synthetic_shapes'
  c.data.crop_size = (64, 64)
  c.data.num_workers = 0
  c.data.photometric = False
  c.data.eval_pad_to = None
  c.train.num_steps = 10
  c.train.batch_size = 8
  c.train.log_every_steps = 2
  c.eval.every_steps = 10
  c.eval.batch_size = 8
  c.checkpoint.every_steps = 5
  c.optim.grad_accum_steps = 1
  c.loss.class_weights = None
  c.loss.ohem_thresh = 0.0
  return c
