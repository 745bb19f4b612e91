"""Tools around a job, never used by one: a recipe planned ahead of time for
a TPU slice from any host (libtpu's compile-only client; nothing runs).

- `chips`: the TPU generations' data sheets and a topology's devices.
- `compiling`: the run's programs compiled for a topology; memory, fit and
  the largest batch that fits.
- `traffic`: what a compiled step's instructions read and write, by memory
  level, kind and model source; its collectives and convolutions.
- `planner`: `plan(config, topology, num_classes)`, one row: memory, fit,
  rooflines, collectives, traffic.
- `tables`: rows as Markdown.
- `compile_profile`: where the TPU compiler's time goes, from libtpu's log.
"""
