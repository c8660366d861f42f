"""DiffAugment (Zhao et al., NeurIPS 2020) in JAX.

Differentiable augmentations applied to every image the discriminator sees,
real and generated alike, so that D cannot memorise a small training set and
G still receives gradients through the augmentation. Images are
[batch, height, width, channels] in [-1, 1]; every image in a batch gets its
own random draw. Policies follow the reference implementation:

* ``color``: brightness (+U(-0.5, 0.5)), saturation (x U(0, 2)) and contrast
  (x U(0.5, 1.5)).
* ``translation``: integer shift of up to 1/8 of the height / width, the
  uncovered border filled with zeros.
* ``cutout``: one zeroed rectangle of half the height and width at a random
  centre (it may overhang the border).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rand_brightness(x: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
  shift = jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype) - 0.5
  return x + shift


def rand_saturation(x: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  factor = jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype) * 2.0
  return (x - mean) * factor + mean


def rand_contrast(x: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  factor = jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype) + 0.5
  return (x - mean) * factor + mean


def rand_translation(x: jnp.ndarray, key: jax.Array, ratio: float = 0.125) -> jnp.ndarray:
  """Shift each image by up to ``ratio`` of its size; ratio 0 is the identity."""
  b, h, w = x.shape[:3]
  max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
  key_y, key_x = jax.random.split(key)
  dy = jax.random.randint(key_y, (b, 1, 1), -max_dy, max_dy + 1)
  dx = jax.random.randint(key_x, (b, 1, 1), -max_dx, max_dx + 1)
  rows = jnp.arange(h)[None, :, None] + dy  # [b, h, 1] source row
  cols = jnp.arange(w)[None, None, :] + dx  # [b, 1, w] source column
  inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # [b, h, w]
  batch = jnp.arange(b)[:, None, None]
  # A gather, so the gradient flows back to the source pixels.
  moved = x[batch, jnp.clip(rows, 0, h - 1), jnp.clip(cols, 0, w - 1)]
  return jnp.where(inside[..., None], moved, 0.0)


def rand_cutout(x: jnp.ndarray, key: jax.Array, ratio: float = 0.5) -> jnp.ndarray:
  """Zero one rectangle of ``ratio`` x (height, width) per image."""
  b, h, w = x.shape[:3]
  size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
  key_y, key_x = jax.random.split(key)
  # Same range of centres as the reference code (one more for even sizes).
  cy = jax.random.randint(key_y, (b, 1, 1), 0, h + (1 - size_y % 2))
  cx = jax.random.randint(key_x, (b, 1, 1), 0, w + (1 - size_x % 2))
  rows = jnp.arange(h)[None, :, None] - (cy - size_y // 2)
  cols = jnp.arange(w)[None, None, :] - (cx - size_x // 2)
  cut = (rows >= 0) & (rows < size_y) & (cols >= 0) & (cols < size_x)  # [b, h, w]
  return x * (~cut)[..., None].astype(x.dtype)


AUGMENT_FNS = {
    'color': (rand_brightness, rand_saturation, rand_contrast),
    'translation': (rand_translation,),
    'cutout': (rand_cutout,),
}


def parse_policy(policy: str) -> tuple[str, ...]:
  """'color,translation' -> ('color', 'translation'); '' -> (). Raises on unknown names."""
  names = tuple(p.strip() for p in policy.split(',') if p.strip())
  unknown = [n for n in names if n not in AUGMENT_FNS]
  if unknown:
    raise ValueError(f'Unknown DiffAugment policy item(s) {unknown}; '
                     f'expected a comma-separated subset of {sorted(AUGMENT_FNS)}')
  return names


def diff_augment(x: jnp.ndarray, key: jax.Array,
                 policy: str = 'color,translation,cutout') -> jnp.ndarray:
  """Augment a batch [b, h, w, c] in [-1, 1]; differentiable w.r.t. ``x``.

  Each transform draws from its own key, ``fold_in(fold_in(key, i), j)`` for
  policy item i and transform j, so adding an item does not change the draws
  of the items before it.
  """
  for i, name in enumerate(parse_policy(policy)):
    for j, fn in enumerate(AUGMENT_FNS[name]):
      x = fn(x, jax.random.fold_in(jax.random.fold_in(key, i), j))
  return x
