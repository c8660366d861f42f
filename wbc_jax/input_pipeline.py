"""Input pipeline: TFDS `bccd_wbc` -> views -> splits -> tf.data batches -> numpy.

Shapes: S seeds, B batch, (H, W) the view's size.
  train batches  {'image': float32 [S, B, H, W, 3] in [0, 1], 'label': int32 [S, B]}
  eval batches   {'image': float32 [B, H, W, 3], 'label': int32 [B], 'mask': bool [B]}

Views:
  frame  the whole 640x480 smear resized to `frame_size` (60x80, as the paper).
  crop   a square around the WBC box, resized to `crop_size`, in one of two modes
         (`crop_mode`):
           box     `crop_margin` wider than the box's longer side, kept inside the
                   frame: every cell fills its crop, so absolute cell size is lost
                   (the recorded study's crops).
           window  a fixed `window_px` square of the frame centred on the box, the
                   smear mirrored where the window leaves the frame: one pixel of the
                   crop is the same size for every cell, so cell size is kept.
         When an annotation holds two WBC boxes the larger one is used (in this copy
         one image, 113, has two); images whose annotation holds no WBC box (4 here)
         are centred on the frame (`crops.FALLBACK_CROP_PX` square in box mode), so both
         views hold the same images and the same splits.

Splits are computed on `image_id`, sorted, with scikit-learn's stratified splitters
and a fixed `split_seed` (numpy's legacy RandomState, stable across machines):
  holdout  15% test, then 15% of the rest validation (the paper's proportions).
  kfold    repeated stratified K-fold; validation is carved, stratified, from each
           training fold, never from the test fold.
  paper    the holdout split, named 'paper'. The published study split its pool of real
           and synthetic images this way (LEAKY: see `pool_with_synthetic` and
           wbc_jax.ablation.paper_pool); on real images alone it is the holdout split.
Training images can be topped up with extra (synthetic) images through `extra=`
of `train_batches`; evaluation sets never receive them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split

from wbc_jax import bccd_wbc
from wbc_jax import crops
from wbc_jax import folder_data

# 'located': trained on the crops at the annotated boxes, like 'crop', but its validation
# and test images are cropped where the localiser found the cell (`wbc_jax.located`).
VIEWS = ('frame', 'crop', 'located')
PROTOCOLS = ('holdout', 'kfold', 'paper')
SAMPLINGS = ('uniform', 'balanced', 'sqrt')
# Class-draw probability proportional to (class count) ** power, per class-aware sampling.
SAMPLING_POWER = {'balanced': 0.0, 'sqrt': 0.5}


@dataclasses.dataclass(frozen=True)
class Examples:
  """All examples of one view, in image_id order.

  Real images only, except in the pool of the paper protocol (`pool_with_synthetic`),
  whose `is_synthetic` marks the synthetic ones.
  """
  images: np.ndarray      # uint8 [N, H, W, 3]
  labels: np.ndarray      # int32 [N]
  image_ids: np.ndarray   # int32 [N]; str [N] in a pool with synthetic images
  class_names: tuple[str, ...]
  is_synthetic: np.ndarray | None = None  # bool [N]; None: all real

  def take(self, index: np.ndarray) -> 'Examples':
    synthetic = None if self.is_synthetic is None else self.is_synthetic[index]
    return Examples(self.images[index], self.labels[index], self.image_ids[index],
                    self.class_names, synthetic)

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Split:
  """Indices into an `Examples` for one (protocol, repeat, fold)."""
  name: str
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray


# ----------------------------------------------------------------------------- loading


def check_view(view: str) -> None:
  if view not in VIEWS:
    raise ValueError(f"config.data.view: unknown view {view!r}; "
                     f"expected one of {', '.join(VIEWS)}.")


def _download_config(manual_dir: str | None):
  if manual_dir:
    bccd_wbc.find_manual_files(manual_dir)  # a clear error before TFDS runs
    return tfds.download.DownloadConfig(manual_dir=os.path.abspath(manual_dir))
  return tfds.download.DownloadConfig()


def load_raw(data_config) -> dict:
  """Loads (and prepares on first use) `bccd_wbc`: whole frames [N, 480, 640, 3] and boxes;
  or with data.name='folder' the collection in `data.folder` (`wbc_jax.folder_data`).

  Cached per process on (name, data_dir, manual_dir): every view and run of an ablation
  reads the dataset once. Callers must not modify the returned arrays.
  """
  if data_config.name == folder_data.NAME:
    return folder_data.load(data_config.folder, tuple(data_config.folder_classes))
  return _load_raw(data_config.name, data_config.data_dir or None, data_config.manual_dir or None)


@functools.lru_cache(maxsize=8)
def _load_raw(name: str, data_dir: str | None, manual_dir: str | None) -> dict:
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(download_config=_download_config(manual_dir))
  ds = builder.as_dataset(split='train', shuffle_files=False)
  images, labels, ids, boxes = [], [], [], []
  for ex in ds.as_numpy_iterator():
    images.append(ex['image'])
    labels.append(ex['label'])
    ids.append(ex['image_id'])
    boxes.append(ex['wbc_boxes']['bbox'] if isinstance(ex['wbc_boxes'], dict) else ex['wbc_boxes'])
  order = np.argsort(ids)
  return {
      'images': np.stack(images)[order],
      'labels': np.asarray(labels, np.int32)[order],
      'image_ids': np.asarray(ids, np.int32)[order],
      'boxes': [np.reshape(boxes[i], (-1, 4)) for i in order],
      'class_names': tuple(builder.info.features['label'].names),
  }


def image_size(data_config) -> tuple[int, int]:
  """(height, width) of the images of `data_config.view`."""
  check_view(data_config.view)
  if data_config.view == 'frame':
    return tuple(data_config.frame_size)
  return (data_config.crop_size, data_config.crop_size)


def make_view(raw: dict, data_config) -> Examples:
  """Resizes frames or crops WBCs at their annotated boxes ('crop' and 'located');
  returns uint8 images of the view's size."""
  size, frames = image_size(data_config), raw['images']
  if data_config.view == 'frame':
    out = tf.image.resize(frames, size, method='area')
    images = np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)
  else:
    images = crops.crop_cells(frames, raw['boxes'], data_config)
  return Examples(images, raw['labels'], raw['image_ids'], raw['class_names'])


def load_examples(data_config) -> Examples:
  """The whole dataset in one view."""
  check_view(data_config.view)
  return make_view(load_raw(data_config), data_config)


def synthetic_image_ids(labels: np.ndarray, class_names) -> np.ndarray:
  """Names of synthetic images, 'synthetic_<class>_<k>' with k counted per class. str [M]."""
  labels = np.asarray(labels)
  counter = {c: 0 for c in range(len(class_names))}
  ids = []
  for c in labels.tolist():
    ids.append(f'synthetic_{class_names[c]}_{counter[c]}')
    counter[c] += 1
  return np.asarray(ids, dtype=str)


def pool_with_synthetic(examples: Examples, images: np.ndarray, labels: np.ndarray) -> Examples:
  """The real examples followed by synthetic ones (uint8 [M, H, W, 3], int [M]), one set.

  Only the paper protocol splits such a pool (it puts synthetic images in every split);
  image_ids become strings: the real ids in decimal, then `synthetic_image_ids`.
  """
  if examples.is_synthetic is not None:
    raise ValueError('these examples already hold synthetic images')
  return Examples(
      images=np.concatenate([examples.images, images]),
      labels=np.concatenate([examples.labels, np.asarray(labels, np.int32)]),
      image_ids=np.concatenate([examples.image_ids.astype(str),
                                synthetic_image_ids(labels, examples.class_names)]),
      class_names=examples.class_names,
      is_synthetic=np.concatenate([np.zeros(len(examples), bool), np.ones(len(labels), bool)]))


# ----------------------------------------------------------------------------- splits


def make_splits(labels: np.ndarray, split_config) -> list[Split]:
  """All splits of the protocol, in (repeat, fold) order; indices are sorted."""
  protocol = split_config.protocol
  if protocol not in PROTOCOLS:
    raise ValueError(f"config.split.protocol: unknown protocol {protocol!r}; expected one of "
                     f"{', '.join(PROTOCOLS)}.")
  labels = np.asarray(labels)
  index = np.arange(len(labels))
  seed = split_config.split_seed
  val_fraction = split_config.val_fraction

  def carve_val(train_full, salt):
    tr, va = train_test_split(train_full, test_size=val_fraction, stratify=labels[train_full],
                              random_state=seed + salt)
    return np.sort(tr), np.sort(va)

  if protocol in ('holdout', 'paper'):
    rest, test = train_test_split(index, test_size=split_config.test_fraction, stratify=labels,
                                  random_state=seed)
    train, val = carve_val(rest, 1)
    # The paper protocol's split is the holdout one; named apart, its runs (and its GAN,
    # trained on every image) never share a directory with honest ones.
    return [Split(protocol, train, val, np.sort(test))]
  splitter = RepeatedStratifiedKFold(n_splits=split_config.folds, n_repeats=split_config.repeats,
                                     random_state=seed)
  splits = []
  for i, (train_full, test) in enumerate(splitter.split(index, labels)):
    r, k = divmod(i, split_config.folds)
    train, val = carve_val(train_full, 1 + i)
    splits.append(Split(f'r{r}_k{k}', train, val, np.sort(test)))
  return splits


# ----------------------------------------------------------------------------- augmentation


def _rotate(image: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
  """Rotates [H, W, C] about its centre; out-of-frame pixels copy the nearest edge
  (Keras ImageDataGenerator's default fill, which the paper used)."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2).
  transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                        sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='NEAREST')
  return out[0]


def augment_image(image: tf.Tensor, seed: tf.Tensor, aug) -> tf.Tensor:
  """Traditional augmentation of one float image [H, W, 3] in [0, 1].

  `seed` is an int64 [2] stateless seed; each operation draws from its own sub-seed,
  so switching one operation on or off does not change the draws of the others.
  """
  seeds = tf.random.experimental.stateless_split(seed, num=8)
  if aug.hflip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
  if aug.vflip:
    image = tf.image.stateless_random_flip_up_down(image, seeds[1])
  if aug.rot90:
    square = image.shape[0] == image.shape[1]
    # A non-square frame only admits 0 or 180 degrees without changing its shape.
    k = tf.random.stateless_uniform([], seeds[2], 0, 4 if square else 2, tf.int32)
    image = tf.image.rot90(image, k if square else 2 * k)
  if aug.rotation_deg > 0:
    limit = aug.rotation_deg * np.pi / 180
    angle = tf.random.stateless_uniform([], seeds[3], -limit, limit)
    image = _rotate(image, angle)
  if aug.color_jitter > 0:
    j = aug.color_jitter
    image = tf.image.stateless_random_brightness(image, j, seeds[4])
    image = tf.image.stateless_random_contrast(image, 1 - j, 1 + j, seeds[5])
    image = tf.image.stateless_random_saturation(image, 1 - j, 1 + j, seeds[6])
    image = tf.image.stateless_random_hue(image, min(j / 4, 0.5), seeds[7])
  return tf.clip_by_value(image, 0.0, 1.0)


def augmentation_enabled(aug) -> bool:
  return bool(aug.hflip or aug.vflip or aug.rot90 or aug.rotation_deg > 0 or aug.color_jitter > 0)


# ----------------------------------------------------------------------------- batches


def epoch_indices(num_examples: int, batch_size: int, seed: int, epoch: int,
                  part: int = 0) -> np.ndarray:
  """The training order of one seed's epoch, int [steps, batch_size].

  A permutation drawn from (seed, epoch); the last batch is filled up with the start
  of the same permutation, so every example is seen at least once per epoch and all
  batches are full (static shapes, no masked training steps). part > 0 draws a further
  pass of the same epoch (epochs of a fixed number of steps longer than one pass).
  """
  key = [seed, epoch, 0x5EED] + ([part] if part else [])
  perm = np.random.default_rng(key).permutation(num_examples)
  steps = -(-num_examples // batch_size)
  return perm[np.arange(steps * batch_size) % num_examples].reshape(steps, batch_size)


def balanced_epoch_indices(labels: np.ndarray, batch_size: int, steps: int, seed: int,
                           epoch: int, power: float = 0.0) -> np.ndarray:
  """Class-aware training order of one seed's epoch, int [steps, batch_size].

  Every draw picks a class with probability proportional to (its image count) ** power
  among the classes present (power 0: each class equally often; 0.5: square-root
  sampling, between balanced and the natural frequencies; 1: the natural frequencies),
  then an image of that class; each class's images are walked through in a fresh
  permutation (recycled when used up), so within a class no image repeats before all
  have been seen. Drawn from (seed, epoch), like `epoch_indices`.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, epoch, 0xBA1])
  classes, counts = np.unique(labels, return_counts=True)
  if power == 0:  # the balanced draw as recorded runs made it
    picks = classes[rng.integers(0, len(classes), steps * batch_size)]
  else:
    weights = counts.astype(np.float64) ** power
    picks = classes[rng.choice(len(classes), steps * batch_size, p=weights / weights.sum())]
  order = np.empty(steps * batch_size, np.int64)
  for c in classes:
    members = np.flatnonzero(labels == c)
    slots = np.flatnonzero(picks == c)
    reps = -(-len(slots) // len(members))
    walk = np.concatenate([rng.permutation(members) for _ in range(max(reps, 1))])
    order[slots] = walk[:len(slots)]
  return order.reshape(steps, batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)


def epoch_steps(train_config, *, num_real: int, num_extra: int) -> int:
  """Optimizer steps per epoch of one seed.

  train_config.steps_per_epoch_basis: 'all' (the paper's) makes an epoch one pass over the
  real and synthetic training images; 'real' makes it as many steps as one pass over the real
  images, each epoch's batches drawn from a fresh permutation of the whole pool, so a regime
  with synthetic images gets the same number of updates as one without ('all' gives a class
  topped up to 300 images about five times more). max_steps_per_epoch > 0 caps either.
  """
  fixed = int(train_config.steps_per_epoch)
  if fixed > 0:
    # An epoch of fixed length: the evaluation period of a schedule counted in updates.
    return fixed if train_config.max_steps_per_epoch <= 0 else min(
        fixed, train_config.max_steps_per_epoch)
  basis = train_config.steps_per_epoch_basis
  if basis not in ('all', 'real'):
    raise ValueError(f"config.train.steps_per_epoch_basis: unknown value {basis!r}; expected "
                     "'all' or 'real'.")
  n = num_real + num_extra if basis == 'all' else num_real
  steps = steps_per_epoch(n, train_config.batch_size)
  if train_config.max_steps_per_epoch > 0:
    steps = min(steps, train_config.max_steps_per_epoch)
  return steps


def train_batches(images: np.ndarray, labels: np.ndarray, *, seeds, epoch: int, batch_size: int,
                  aug, augment: bool, extra: tuple[np.ndarray, np.ndarray] | None = None,
                  max_steps: int = -1, sampling: str = 'uniform',
                  steps: int | None = None) -> list[dict[str, np.ndarray]]:
  """One epoch of training batches for S seeds at once, as numpy.

  images: uint8 [N, H, W, 3] (training split only); labels: int [N].
  extra:  optional (uint8 [M, H, W, 3], int [M]) synthetic images, appended to the
          training set of every seed; they never reach an evaluation split.
  max_steps: if > 0, only the first max_steps batches (short test runs).
  sampling: 'uniform' (each image once per pass, `epoch_indices`; an epoch of `steps`
          batches is as many passes as that takes, else one pass), 'balanced' (each
          class equally often) or 'sqrt' (classes in proportion to the square root of
          their counts), both `balanced_epoch_indices` with `steps` batches (default: as
          many as a uniform epoch).
  Each seed has its own order and augmentation draws, both derived from (seed, epoch).
  Returns [{'image': float32 [S, B, H, W, 3], 'label': int32 [S, B]}] * steps.
  """
  if extra is not None and len(extra[0]):
    images = np.concatenate([images, extra[0]])
    labels = np.concatenate([labels, extra[1]])
  seeds = [int(s) for s in seeds]
  num_seeds = len(seeds)
  if sampling not in SAMPLINGS:
    raise ValueError(f"config.train.sampling: unknown value {sampling!r}; expected one of "
                     f"{', '.join(SAMPLINGS)}.")
  if sampling in SAMPLING_POWER:
    n_steps = steps or steps_per_epoch(len(labels), batch_size)
    order = np.stack([balanced_epoch_indices(labels, batch_size, n_steps, s, epoch,
                                             power=SAMPLING_POWER[sampling])
                      for s in seeds], axis=1)
  else:
    # One pass per epoch, or as many passes as `steps` asks for (each a fresh permutation).
    def passes(s):
      out = [epoch_indices(len(labels), batch_size, s, epoch)]
      while steps and sum(len(o) for o in out) < steps:
        out.append(epoch_indices(len(labels), batch_size, s, epoch, part=len(out)))
      order = np.concatenate(out)
      return order[:steps] if steps else order
    order = np.stack([passes(s) for s in seeds], axis=1)
  if max_steps > 0:
    order = order[:max_steps]
  steps = order.shape[0]
  flat = order.reshape(-1)  # step-major: [steps, S, B] flattened
  # Per-element stateless seeds (seed, epoch * 2^20 + position in that seed's epoch): a
  # seed's draws do not depend on which other seeds train beside it.
  position = np.arange(steps * batch_size, dtype=np.int64).reshape(steps, 1, batch_size)
  elem_seed = np.stack([
      np.broadcast_to(np.asarray(seeds, np.int64)[None, :, None], order.shape).reshape(-1),
      np.broadcast_to(epoch * (1 << 20) + position, order.shape).reshape(-1)], axis=1)
  table_images = tf.constant(images)
  table_labels = tf.constant(np.asarray(labels, np.int32))

  def load(i, s):
    image = tf.cast(tf.gather(table_images, i), tf.float32) / 255.0
    if augment:
      image = augment_image(image, s, aug)
    return image, tf.gather(table_labels, i)

  ds = tf.data.Dataset.from_tensor_slices((flat, elem_seed))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(num_seeds * batch_size, drop_remainder=True)
  ds = ds.map(lambda x, y: (tf.reshape(x, [num_seeds, batch_size, *images.shape[1:]]),
                            tf.reshape(y, [num_seeds, batch_size])))
  # The epoch is materialised before JAX runs on it: on a 2-core CPU tf.data's threads
  # would only compete with XLA's, and keeping TF idle while JAX computes avoids
  # thread-pool interactions between the two runtimes (we saw a hang without this).
  return [{'image': x, 'label': y} for x, y in ds.as_numpy_iterator()]


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-order evaluation batches, the last padded, with a mask: every example counts once.

  Yields {'image': float32 [B, H, W, 3], 'label': int32 [B], 'mask': bool [B]}.
  """
  n = len(labels)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    x = images[start:stop].astype(np.float32) / 255.0
    y = np.asarray(labels[start:stop], np.int32)
    mask = np.ones(stop - start, bool)
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
      y = np.concatenate([y, np.zeros(pad, np.int32)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    yield {'image': x, 'label': y, 'mask': mask}


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of uint8 images [N, H, W, 3], on the [0, 1]
  scale the models see: float32 [3] each. Callers pass training images only."""
  x = np.asarray(images, np.float64).reshape(-1, images.shape[-1]) / 255.0
  return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-3).astype(np.float32)


def class_counts(labels: np.ndarray, class_names) -> dict[str, int]:
  counts = np.bincount(np.asarray(labels), minlength=len(class_names))
  return {name: int(c) for name, c in zip(class_names, counts)}
