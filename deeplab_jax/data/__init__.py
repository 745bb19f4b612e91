"""Data sets, label tables and input pipelines."""
