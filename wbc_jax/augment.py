"""Augmentation of a training batch inside the jitted step, and the 8 views of test-time
augmentation.

A blood cell on a smear has no orientation: any rotation or reflection of a crop is as
likely an image of the same cell type as the crop itself. The training augmentation here
draws, per image, an element of the dihedral group D4 (the 8 flips and rotations by 90
degrees, exact permutations of the pixels), an arbitrary rotation, a small scale change and
shift (one bilinear resampling, mirrored at the border: the smear continues outside the
window, and a mirror continues it more plausibly than a constant), and a colour jitter
(brightness, contrast, saturation and a small hue rotation: colour is a cue, eosinophil
granules are red-orange, so the hue jitter stays small).

It runs in JAX on the batch, inside the train step, with the step's key: on the 2-core CPU
this costs ~1-2% of a step of the crop network, where tf.data's per-image map of the same
operations ran at ~840 images/s, about a third of the step's own time
(scripts/benchmark.py, "augmentation"). The paper's own augmentation (rotation within 10
degrees and horizontal flips, Keras' nearest fill) stays in tf.data
(`wbc_jax.input_pipeline.augment_image`), where it reproduces the original.

Shapes: images float32 [B, H, W, C] in [0, 1] (before standardisation).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ('tfdata', 'jax')


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """The static description of the augmentation (hashable: part of the jitted program).

  Attributes:
    hflip, vflip: random flips along each axis.
    rot90: a random rotation by a multiple of 90 degrees (square images only); with both
      flips this draws uniformly from the 8 elements of D4.
    rotation_deg: a rotation angle drawn uniformly from [-rotation_deg, rotation_deg];
      180 gives every orientation.
    scale: the zoom factor drawn log-uniformly from [1 / (1 + scale), 1 + scale].
    shift: a translation drawn uniformly from [-shift, shift] times the image size, per axis.
    brightness: an offset drawn from [-brightness, brightness].
    contrast, saturation: factors drawn from [1 - x, 1 + x].
    hue: a rotation of the chroma (YIQ) by an angle drawn from [-hue, hue] turns.
  """
  hflip: bool = False
  vflip: bool = False
  rot90: bool = False
  rotation_deg: float = 0.0
  scale: float = 0.0
  shift: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0

  @classmethod
  def from_config(cls, aug) -> 'AugmentSpec':
    """From a config's `augment` group; `color_jitter` sets the four colour fields at once,
    as the tf.data augmentation reads it (hue: color_jitter / 4)."""
    j = float(aug.color_jitter)
    return cls(
        hflip=bool(aug.hflip), vflip=bool(aug.vflip), rot90=bool(aug.rot90),
        rotation_deg=float(aug.rotation_deg), scale=float(aug.scale), shift=float(aug.shift),
        brightness=float(aug.brightness) or j, contrast=float(aug.contrast) or j,
        saturation=float(aug.saturation) or j, hue=float(aug.hue) or j / 4)

  @property
  def geometric(self) -> bool:
    return self.rotation_deg > 0 or self.scale > 0 or self.shift > 0

  @property
  def colour(self) -> bool:
    return self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0


def d4(image: jax.Array, k: jax.Array) -> jax.Array:
  """Element k (int in [0, 8)) of D4 applied to a square image [H, W, C].

  Bit 0 flips the rows, bit 1 the columns, bit 2 transposes: every combination is one of
  the 8 symmetries of the square, and each is a permutation of the pixels.
  """
  image = jnp.where(k & 4, jnp.swapaxes(image, 0, 1), image)
  image = jnp.where(k & 1, image[::-1], image)
  return jnp.where(k & 2, image[:, ::-1], image)


def d4_views(images: jax.Array) -> jax.Array:
  """The 8 D4 views of a batch of square images: [B, H, W, C] -> [8, B, H, W, C]."""
  return jnp.stack([jax.vmap(lambda x, k=k: d4(x, jnp.int32(k)))(images) for k in range(8)])


def _mirror(coord: jax.Array, size: int) -> jax.Array:
  """Continuous coordinates reflected into [0, size - 1] (the border pixel not repeated)."""
  if size == 1:
    return jnp.zeros_like(coord)
  period = 2.0 * (size - 1)
  m = jnp.mod(coord, period)
  return jnp.where(m > size - 1, period - m, m)


def affine_resample(image: jax.Array, matrix: jax.Array, offset: jax.Array) -> jax.Array:
  """Bilinear resampling of [H, W, C] about its centre, mirrored at the border.

  The output pixel at p (row, col) takes the input at matrix @ (p - c) + c + offset,
  c the image centre; matrix [2, 2], offset [2] in pixels.
  """
  h, w, _ = image.shape
  centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                            indexing='ij')
  p = jnp.stack([rows, cols], -1) - centre  # [H, W, 2]
  src = p @ matrix.T + centre + offset
  y, x = _mirror(src[..., 0], h), _mirror(src[..., 1], w)
  y0, x0 = jnp.floor(y), jnp.floor(x)
  wy, wx = (y - y0)[..., None], (x - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, w - 1)
  top = image[y0, x0] * (1 - wx) + image[y0, x1] * wx
  bottom = image[y1, x0] * (1 - wx) + image[y1, x1] * wx
  return top * (1 - wy) + bottom * wy


def _grey(image: jax.Array) -> jax.Array:
  return image @ jnp.array([0.299, 0.587, 0.114], image.dtype)


# RGB <-> YIQ: hue is the angle of (I, Q), so a hue shift is a rotation in that plane.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                np.float32)
_RGB = np.linalg.inv(_YIQ).astype(np.float32)


def _colour(image: jax.Array, key: jax.Array, spec: AugmentSpec) -> jax.Array:
  kb, kc, ks, kh = jax.random.split(key, 4)
  u = lambda k, lo, hi: jax.random.uniform(k, (), jnp.float32, lo, hi)
  if spec.brightness > 0:
    image = image + u(kb, -spec.brightness, spec.brightness)
  if spec.contrast > 0:
    mean = jnp.mean(_grey(image))
    image = (image - mean) * u(kc, 1 - spec.contrast, 1 + spec.contrast) + mean
  if spec.saturation > 0:
    grey = _grey(image)[..., None]
    image = (image - grey) * u(ks, 1 - spec.saturation, 1 + spec.saturation) + grey
  if spec.hue > 0:
    angle = 2 * jnp.pi * u(kh, -spec.hue, spec.hue)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rot = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) \
        .at[1:, 1:].set(jnp.array([[cos, -sin], [sin, cos]]))
    image = image @ (jnp.asarray(_RGB) @ rot @ jnp.asarray(_YIQ)).T
  return jnp.clip(image, 0.0, 1.0)


def augment_image(image: jax.Array, key: jax.Array, spec: AugmentSpec) -> jax.Array:
  """One image [H, W, C] in [0, 1], augmented with draws from `key` (same shape)."""
  k_flip, k_geo, k_col = jax.random.split(key, 3)
  h, w, _ = image.shape
  kh, kv, kr = jax.random.split(k_flip, 3)
  if spec.hflip:
    image = jnp.where(jax.random.bernoulli(kh), image[:, ::-1], image)
  if spec.vflip:
    image = jnp.where(jax.random.bernoulli(kv), image[::-1], image)
  if spec.rot90:
    if h != w:
      raise ValueError(f'augment.rot90 needs square images, got {h}x{w}.')
    k = jax.random.randint(kr, (), 0, 4)
    image = jax.lax.switch(k, [lambda x, i=i: jnp.rot90(x, i) for i in range(4)], image)
  if spec.geometric:
    ka, ks, kt = jax.random.split(k_geo, 3)
    limit = np.deg2rad(spec.rotation_deg)
    angle = jax.random.uniform(ka, (), jnp.float32, -limit, limit)
    log_s = np.log1p(spec.scale)
    zoom = jnp.exp(jax.random.uniform(ks, (), jnp.float32, -log_s, log_s))
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # Sampling the input at R(angle) p / zoom shows it rotated and magnified by zoom.
    matrix = jnp.array([[cos, -sin], [sin, cos]]) / zoom
    offset = jax.random.uniform(kt, (2,), jnp.float32, -spec.shift, spec.shift) * \
        jnp.array([h, w], jnp.float32)
    image = affine_resample(image, matrix, offset)
  if spec.colour:
    image = _colour(image, k_col, spec)
  return image


def augment_batch(images: jax.Array, key: jax.Array, spec: AugmentSpec) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C], each image with its own draws from `key`."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(augment_image, in_axes=(0, 0, None))(images, keys, spec)


def check_impl(impl: str, aug) -> None:
  """Validates config.augment.impl and the fields only the JAX implementation has."""
  if impl not in IMPLS:
    raise ValueError(f"config.augment.impl: unknown value {impl!r}; expected one of "
                     f"{', '.join(IMPLS)}.")
  if impl == 'tfdata':
    extra = [f for f in ('scale', 'shift', 'brightness', 'contrast', 'saturation', 'hue')
             if float(aug[f]) > 0]
    if extra:
      raise ValueError(f"config.augment.{extra[0]}: only config.augment.impl='jax' implements "
                       "it; the tf.data augmentation has hflip, vflip, rot90, rotation_deg and "
                       "color_jitter.")
