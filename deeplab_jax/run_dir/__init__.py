"""A run's directory, one concern per module: `record` (the config it
belongs to), `writer_lock` (the one process that writes it) and
`metrics_log` (metrics.jsonl and TensorBoard). Checkpoints (`checkpoints/`)
are `checkpointing`'s."""
