"""How Orbax writes the job's arrays: replica-parallel only across
processes.

Orbax's default (`use_replica_parallel` on CPU and TPU) splits every
replicated array into one slice per replica so that the replicas write
in parallel. Within one process every slice is written by the same
process, and taking each slice dispatches an indexing program per array
shape: the first save of a run compiles one per parameter shape
(docs/training.md gives the cost). In a job of several processes the
slices spread the writing over the hosts, which is what the option is
for.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store


def configure_for_this_job() -> None:
  """Registers Orbax's array handler for this process: replica-parallel
  writes if the job has several processes, whole arrays from replica 0
  otherwise. Orbax's registry is per process, as the choice is."""
  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
      # What Orbax's own default handler keeps: per-host array metadata.
      array_metadata_store=array_metadata_store.Store(),
      use_replica_parallel=jax.process_count() > 1,
    ),
    override=True,
  )
