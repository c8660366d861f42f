"""wbc_jax: white-blood-cell classification with GAN augmentation in JAX/Flax."""
