"""deeplab-jax: DeepLabV3, DeepLabV3+ and DenseASPP in JAX/Flax NNX."""

import glob
import os

__version__ = '0.1.0'


def _quiet_libtpu_without_tpu() -> None:
  """On a host with libtpu installed (the `tpu` and `test` extras) and no
  TPU attached, JAX loads libtpu to discover its devices, and libtpu,
  finding neither its accelerator type nor its workers' hostnames, prints
  five lines, one an `E0000 ... INVALID_ARGUMENT` error: harmless, but
  it reads as a failure. Naming a single local worker and an accelerator
  type keeps it quiet; topologies for compile-only plans are named
  explicitly and are unaffected. libtpu reads these when it loads (the
  first backend or topology), so setting them here is early enough. A
  host with TPU chips, or a user's own values, are left alone."""
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    with open(vendor) as f:
      if f.read().strip() == '0x1ae0':  # Google: a TPU chip is attached
        return
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-1')


_quiet_libtpu_without_tpu()
