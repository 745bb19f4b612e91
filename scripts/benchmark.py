r"""Measures training / inference speed and memory, JAX vs PyTorch, in one run.

  python -m scripts.benchmark --arch deeplabv3_resnet50 --batch 2 \
      --size 512x512 --steps 5 [--dtype bfloat16] [--torch]
  python -m scripts.benchmark --arch deeplabv3_resnet_tiny --batch 1 \
      --devices 1,2,4,8 --param_sharding replicated,fsdp   # scaling
  python -m scripts.benchmark --arch deeplabv3plus_resnet_tiny --batch 1 \
      --size 1024x2048 --devices 8 --spatial 1,2,4,8   # split images
  python -m scripts.benchmark --data --workers 0,1,2   # input pipeline
  python -m scripts.benchmark --table gpu --torch --torch_compile \
      --output gpu.jsonl --deadline_s 540   # the GPU table, one command

Every measurement runs in a fresh child process, so peak memory (device
`peak_bytes_in_use`, or process RSS on CPU) belongs to that one model and
framework. Prints one JSON object per measurement (`framework`, `arch`,
`batch`, `size`, `dtype`, `train_img_s`, `eval_img_s`, `peak_mem_mb`,
`gflops_per_img`, `train_tflop_s`, `train_mfu`, ...) and a markdown table.
`--output` appends each row to a JSON-lines file as it finishes; a failed
measurement (e.g. out of memory) or one stopped by `--deadline_s` is a row
with `error`, and the run goes on. `--table` runs prepared rows instead of
--arch/--batch/--size/--dtype (the framework flags choose the phases:
`--nojax --torch` is PyTorch only). The PyTorch rows need the test extra.
On CPU, `--devices N` simulates N devices (JAX_NUM_CPU_DEVICES).
"""

import os
import time

from absl import flags

from deeplab_jax.cli import entry_point, parse_hw, run

_ARCH = flags.DEFINE_list('arch', ['deeplabv3_resnet50'], 'Architectures.')
_BATCH = flags.DEFINE_list(
  'batch', ['2'], 'Images per device (x devices / spatial: the batch).'
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
_JAX = flags.DEFINE_bool('jax', True, 'Measure JAX (--nojax: PyTorch only).')
_TORCH = flags.DEFINE_bool('torch', False, 'Also run the PyTorch reference.')
_TORCH_COMPILE = flags.DEFINE_bool(
  'torch_compile', False, 'Also run it under torch.compile.'
)
_TABLE = flags.DEFINE_enum(
  'table', None, ['gpu', 'tiny'], 'Prepared rows (benchmarking.runs.TABLES).'
)
_OUTPUT = flags.DEFINE_string(
  'output', None, 'Append every row to this JSON-lines file as it comes.'
)
_DEADLINE = flags.DEFINE_float(
  'deadline_s', None, 'Stop measuring this many seconds after the start.'
)
_LOWERING = flags.DEFINE_enum(  # conv_lowering.LOWERINGS (no JAX import yet)
  'conv_lowering',
  'auto',
  ['auto', 'native', 'im2col', 'taps', 'winograd'],
  'JAX convolution lowering (models.conv_lowering.conv2d); auto: per shape.',
)
_REMAT = flags.DEFINE_bool(
  'remat', False, "Recompute each block in backward (model.remat='blocks')."
)
_SCAN = flags.DEFINE_bool(
  'scan_blocks', False, 'Scan runs of identical blocks (model.scan_blocks).'
)
_AUX = flags.DEFINE_bool('aux', False, "Also train DeepLabV3's aux head.")
_MALLOC = flags.DEFINE_bool(
  'tune_malloc', True, 'Tune glibc malloc in both (see docs/benchmarks.md).'
)
_PROFILE = flags.DEFINE_string(
  'profile_dir', None, 'Trace extra train steps here; kernel ms by kind.'
)
_DATA = flags.DEFINE_bool('data', False, 'Benchmark the input pipeline.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'Grain workers.')


@entry_point
def main(argv):
  del argv
  from deeplab_jax.benchmarking import runs as benchmark_runs

  on = (_JAX.value, _TORCH.value, _TORCH_COMPILE.value)
  chosen = dict(zip(benchmark_runs.FRAMEWORKS, on, strict=True))
  common = dict(
    frameworks=[f for f in chosen if chosen[f]],
    tune_malloc=_MALLOC.value,
    profile_dir=_PROFILE.value,
    deadline=_DEADLINE.value and time.monotonic() + _DEADLINE.value,
  )
  if _DATA.value:
    rows = benchmark_runs.input_pipeline_rows([int(w) for w in _WORKERS.value])
  elif _TABLE.value:
    rows = benchmark_runs.table_rows(_TABLE.value, **common)
  else:
    rows = benchmark_runs.model_rows(
      _ARCH.value,
      device_counts=[int(n) for n in _DEVICES.value],
      param_shardings=_PARAM_SHARDING.value,
      spatial_sizes=[int(s) for s in _SPATIAL.value],
      batches=[int(b) for b in _BATCH.value],
      size=parse_hw(_SIZE.value, 'size'),
      steps=_STEPS.value,
      dtype=_DTYPE.value,
      conv_lowering=_LOWERING.value,
      scan_blocks=_SCAN.value,
      remat_blocks=_REMAT.value,
      aux=_AUX.value,
      **common,
    )
  benchmark_runs.print_rows(rows, _OUTPUT.value)


if __name__ == '__main__':
  # JAX and PyTorch share the GPU in one process: no preallocation.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  flags.FLAGS(['benchmark'], known_only=True)  # Grain workers read flags
  run(main)
