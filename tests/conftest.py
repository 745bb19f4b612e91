"""Test setup: 8 simulated CPU devices, set before JAX starts."""

import os

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Keep the 2-core CI machine responsive when two xdist workers run.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
