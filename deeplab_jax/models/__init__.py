"""Model zoo: `create(arch, *, num_classes, rngs, **overrides)`."""

from deeplab_jax.models.registry import create, describe, names

__all__ = ['create', 'describe', 'names']
