"""TFDS builders we own. Importing this package registers them with TFDS."""
