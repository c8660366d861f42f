"""Real images on device for GAN training: a per-class pool, and batches drawn from it.

The pool `[classes, max_count, h, w, 3]` (zero-padded after each class's count) stays on
device, and every step draws its real batch from it with the step's own key, so a GAN's data
order is part of its (seed, step) randomness.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def make_class_pool(images: np.ndarray, labels: np.ndarray, num_classes: int):
  """Per-class image pool for on-device sampling.

  images [n, h, w, 3] float in [0, 1], labels [n] int in [0, num_classes).
  Returns (class_images [num_classes, max_count, h, w, 3] float32 in [-1, 1],
  zero-padded after each class's count; class_counts [num_classes] int32).
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  if images.ndim != 4 or images.shape[-1] != 3 or labels.shape != images.shape[:1]:
    raise ValueError(f'Expected images [n, h, w, 3] and labels [n], '
                     f'got {images.shape}, {labels.shape}')
  # Non-finite values pass: the train loop's guard reports them with the step.
  finite = images[np.isfinite(images)]
  if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
    raise ValueError('Expected images in [0, 1]')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes})')
  counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
  if np.any(counts == 0):
    raise ValueError(f'Every class needs at least one image; counts per class: {counts.tolist()}')
  pool = np.zeros((num_classes, counts.max()) + images.shape[1:], np.float32)
  for c in range(num_classes):
    pool[c, :counts[c]] = images[labels == c] * 2.0 - 1.0
  return pool, counts


def sample_class_batch(key, class_images, class_counts, class_index, batch_size: int):
  """``batch_size`` images of one class drawn with replacement.

  class_images [classes, max_count, h, w, 3]; class_counts [classes];
  class_index int []. Returns (images [b, h, w, 3], labels [b]).
  """
  idx = jax.random.randint(key, (batch_size,), 0, class_counts[class_index])
  labels = jnp.full((batch_size,), class_index, jnp.int32)
  return class_images[class_index, idx], labels


def sample_balanced_batch(key, class_images, class_counts, batch_size: int):
  """Class-balanced batch: each slot draws a class uniformly, then one of its images.

  Returns (images [b, h, w, 3], labels [b]).
  """
  key_class, key_image = jax.random.split(key)
  labels = jax.random.randint(key_class, (batch_size,), 0, class_images.shape[0])
  idx = jax.random.randint(key_image, (batch_size,), 0, class_counts[labels])
  return class_images[labels, idx], labels.astype(jnp.int32)
