"""wbc_jax: white-blood-cell classification with GAN augmentation in JAX/Flax.

Importing the package registers the TFDS dataset `bccd_wbc`.
"""
from wbc_jax import bccd_wbc  # noqa: F401  (registers the TFDS builder)
