"""deeplab-jax: DeepLabV3, DeepLabV3+ and DenseASPP in JAX/Flax NNX."""

__version__ = '0.1.0'
