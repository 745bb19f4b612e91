"""Test setup: 8 simulated CPU devices, set before JAX starts."""

import os
import tempfile

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
# Persistent compilation cache, shared with the subprocess runs: the same
# tiny programs are compiled by many tests.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  os.path.join(tempfile.gettempdir(), 'deeplab_jax_test_jit_cache'),
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Keep the 2-core CI machine responsive when two xdist workers run.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
