"""Model zoo: `create(arch, *, num_classes, rngs, **overrides)`; views for
a target platform: `platform_view(model, platform_of(mesh))`."""

from deeplab_jax.models.registry import (
  create,
  describe,
  names,
  platform_of,
  platform_view,
)

__all__ = ['create', 'describe', 'names', 'platform_of', 'platform_view']
