r"""Measures training / inference speed and memory, JAX vs PyTorch, in one run.

  python -m scripts.benchmark --arch deeplabv3_resnet50 --batch 2 \
      --size 512x512 --steps 5 [--dtype bfloat16] [--torch]
  python -m scripts.benchmark --arch deeplabv3_resnet_tiny --batch 1 \
      --devices 1,2,4,8 --param_sharding replicated,fsdp   # scaling
  python -m scripts.benchmark --arch deeplabv3plus_resnet_tiny --batch 1 \
      --size 1024x2048 --devices 8 --spatial 1,2,4,8   # split images
  python -m scripts.benchmark --data --workers 0,1,2   # input pipeline

Every measurement runs in a fresh child process, so peak memory (device
`peak_bytes_in_use`, or process RSS on CPU) belongs to that one model and
framework. Prints one JSON object per measurement (`framework`, `arch`,
`batch`, `size`, `dtype`, `train_img_s`, `eval_img_s`, `peak_mem_mb`,
`gflops_per_img`, `train_tflop_s`, `train_mfu`, ...) and a markdown table.
`--torch` needs the test extra. On CPU, `--devices N` simulates N devices
(JAX_NUM_CPU_DEVICES) unless that variable is already set.
"""

import os

from absl import flags

from deeplab_jax.cli import entry_point, parse_hw, run

_ARCH = flags.DEFINE_list('arch', ['deeplabv3_resnet50'], 'Architectures.')
_BATCH = flags.DEFINE_integer(
  'batch',
  2,
  'Images per device (global batch = batch x devices / spatial).',
)
_DEVICES = flags.DEFINE_list('devices', ['1'], 'Data-parallel device counts.')
_SPATIAL = flags.DEFINE_list(
  'spatial', ['1'], 'Devices splitting each image (mesh (devices / S, S)).'
)
_PARAM_SHARDING = flags.DEFINE_list(
  'param_sharding', ['replicated'], 'Train-state rules: replicated, fsdp.'
)
_SIZE = flags.DEFINE_string('size', '512x512', 'Input HxW.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (median).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], '')
_TORCH = flags.DEFINE_bool('torch', False, 'Also run the PyTorch reference.')
_LOWERING = flags.DEFINE_enum(
  'conv_lowering',
  'auto',
  # models.conv_lowering.LOWERINGS, spelled out: importing it would start JAX
  # before --devices can set JAX_NUM_CPU_DEVICES.
  ['auto', 'native', 'im2col', 'taps', 'winograd'],
  'JAX convolution lowering (models.conv_lowering.conv2d); auto picks per '
  'shape.',
)
_SCAN = flags.DEFINE_bool(
  'scan_blocks', False, 'Scan identical blocks (one compiled block each).'
)
_MALLOC = flags.DEFINE_bool(
  'tune_malloc',
  True,
  'Run both frameworks with glibc malloc tuned to keep large step buffers '
  'mapped (GLIBC_TUNABLES; see docs/benchmarks.md).',
)
_PROFILE = flags.DEFINE_string(
  'profile_dir',
  None,
  'Trace a few extra train steps of every measurement into a folder here '
  '(TensorBoard / Perfetto) and report device kernel ms per step by kind.',
)
_DATA = flags.DEFINE_bool('data', False, 'Benchmark the input pipeline.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'Grain workers.')


@entry_point
def main(argv):
  del argv
  from deeplab_jax import benchmark_runs

  if _DATA.value:
    rows = benchmark_runs.input_pipeline_rows([int(w) for w in _WORKERS.value])
  else:
    rows = benchmark_runs.model_rows(
      _ARCH.value,
      device_counts=[int(n) for n in _DEVICES.value],
      param_shardings=_PARAM_SHARDING.value,
      spatial_sizes=[int(s) for s in _SPATIAL.value],
      batch_per_device=_BATCH.value,
      size=parse_hw(_SIZE.value, 'size'),
      steps=_STEPS.value,
      dtype=_DTYPE.value,
      conv_lowering=_LOWERING.value,
      scan_blocks=_SCAN.value,
      torch=_TORCH.value,
      tune_malloc=_MALLOC.value,
      profile_dir=_PROFILE.value,
    )
  benchmark_runs.print_rows(rows)


if __name__ == '__main__':
  # JAX and PyTorch share the GPU in one process: no preallocation.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  flags.FLAGS(['benchmark'], known_only=True)  # Grain workers read flags
  run(main)
