"""Sampling trained GANs, and resizing images to and from a GAN's resolution.

  generate(state, config, num_per_class=..., key=...)   images of every class, from the
      (EMA) generator of one seed of a stacked state (`wbc_jax.gan.train.train_gans`)
  resize_images(images, (height, width))                 bilinear, antialiased when shrinking
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wbc_jax.gan import models


@functools.partial(jax.jit, static_argnames=('height', 'width'))
def _resize(images: jax.Array, height: int, width: int) -> jax.Array:
  return jax.image.resize(images, (images.shape[0], height, width, images.shape[3]),
                          method='linear', antialias=True)


def resize_images(images: np.ndarray, size: Sequence[int], batch: int = 256) -> np.ndarray:
  """float [N, H, W, C] -> float32 [N, size[0], size[1], C], bilinear with antialiasing
  when shrinking (jax.image.resize), in batches of `batch` images (one compiled program per
  input shape, cached across calls)."""
  images = np.asarray(images, np.float32)
  height, width = (int(s) for s in size)
  if images.shape[1:3] == (height, width):
    return images
  if not len(images):
    return np.zeros((0, height, width, images.shape[3]), np.float32)
  return np.concatenate([np.asarray(_resize(images[i:i + batch], height, width))
                         for i in range(0, len(images), batch)])


@functools.partial(jax.jit, static_argnames=('generator', 'latent_dim', 'batch_size'))
def _sample(variables, member, class_key, class_index, start, *, generator, latent_dim,
            batch_size):
  """Images start .. start+batch_size-1 of one class from stacked ``variables``.

  Image j's latent is normal(fold_in(class_key, j)), so the images do not
  depend on how a request is split into batches. -> [batch_size, h, w, 3] in [0, 1].
  """
  variables = jax.tree.map(lambda x: x[member], variables)
  keys = jax.vmap(lambda j: jax.random.fold_in(class_key, j))(start + jnp.arange(batch_size))
  z = jax.vmap(lambda k: jax.random.normal(k, (latent_dim,)))(keys)
  labels = jnp.full((batch_size,), class_index, jnp.int32)
  images = generator.apply(variables, z, labels, train=False)
  return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)


def generate(state, config, *, num_per_class: Mapping[int, int] | Sequence[int],
             key: jax.Array, height: int, width: int, num_classes: int,
             seed_index: int = 0, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Images from the trained generators of one seed.

  ``state`` is stacked over members as returned by ``train_gans``;
  ``seed_index`` picks the seed (its position in ``seeds``). Uses the EMA
  generator when ``config.ema_decay > 0`` and BatchNorm running statistics.
  ``num_per_class`` is {class: count} or [count per class]. Image j of class
  c has latent normal(fold_in(fold_in(key, c), j)).

  Returns (images [m, height, width, 3] float32 in [0, 1], labels [m] int32),
  grouped by class in increasing order.
  """
  if isinstance(num_per_class, Mapping):
    counts = [0] * num_classes
    for c, n in num_per_class.items():
      if not 0 <= c < num_classes:
        raise ValueError(f'class {c} outside [0, {num_classes})')
      counts[c] = int(n)
  else:
    counts = [int(n) for n in num_per_class]
    if len(counts) != num_classes:
      raise ValueError(f'num_per_class has {len(counts)} entries, expected {num_classes}')
  generator, _ = models.build_models(config, height, width, num_classes)
  variables = {'params': state.ema_g_params if config.ema_decay > 0 else state.g_params,
               'batch_stats': state.g_batch_stats}
  members = state.step.shape[0]
  all_images, all_labels = [], []
  for c, n in enumerate(counts):
    if n <= 0:
      continue
    member = seed_index * num_classes + c if config.kind == 'paper' else seed_index
    if not 0 <= member < members:
      raise ValueError(f'seed_index {seed_index} out of range for {members} stacked GANs')
    class_key = jax.random.fold_in(key, c)
    for start in range(0, n, batch_size):
      # Always a full batch, so that every call reuses one compiled program.
      images = _sample(variables, member, class_key, c, start, generator=generator,
                       latent_dim=config.latent_dim, batch_size=batch_size)
      all_images.append(np.asarray(images)[:n - start])
    all_labels.append(np.full((n,), c, np.int32))
  if not all_images:
    return np.zeros((0, height, width, 3), np.float32), np.zeros((0,), np.int32)
  return np.concatenate(all_images), np.concatenate(all_labels)
