"""Adversarial losses and the R1 gradient penalty.

All functions take logits [batch] and return scalars. ``loss_type``:

* ``'bce'``: binary cross-entropy on logits. The generator loss is the
  non-saturating one, -log sigmoid(D(G(z))), as in the study's Keras model,
  where G is trained to make D output "real".
* ``'hinge'``: the hinge loss of SNGAN / BigGAN.

The discriminator loss is the *sum* of the real and fake terms (so 'bce' at
logits 0 gives 2 log 2, the generator loss log 2).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LOSS_TYPES = ('bce', 'hinge')


def _check_loss_type(loss_type: str) -> None:
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'Unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}')


def discriminator_loss(*, real_logits: jnp.ndarray, fake_logits: jnp.ndarray,
                       loss_type: str) -> jnp.ndarray:
  """Scalar loss for D given logits on real [b] and generated [b'] images."""
  _check_loss_type(loss_type)
  if loss_type == 'bce':
    real = optax.sigmoid_binary_cross_entropy(real_logits, jnp.ones_like(real_logits))
    fake = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
    return jnp.mean(real) + jnp.mean(fake)
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def generator_loss(*, fake_logits: jnp.ndarray, loss_type: str) -> jnp.ndarray:
  """Scalar loss for G given D's logits on generated images [b]."""
  _check_loss_type(loss_type)
  if loss_type == 'bce':
    return jnp.mean(optax.sigmoid_binary_cross_entropy(fake_logits, jnp.ones_like(fake_logits)))
  return -jnp.mean(fake_logits)


def r1_penalty(*, logits_fn: Callable[[jnp.ndarray], jnp.ndarray],
               images: jnp.ndarray) -> jnp.ndarray:
  """E_x ||d logits_fn(x) / dx||^2 over a batch of real images [b, h, w, c].

  Mescheder et al. (2018) add ``gamma / 2`` times this to the D loss. Taking
  the gradient of the summed logits gives per-image gradients only when the
  discriminator treats images independently (no batch norm); with batch norm
  it is the gradient of the batch's summed logits.
  """
  grads = jax.grad(lambda x: jnp.sum(logits_fn(x)))(images)
  return jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))
