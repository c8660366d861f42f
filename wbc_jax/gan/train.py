"""Training GANs for augmentation: config, state, train step, run loop, sampling.

Two kinds of GAN (``config.kind``):

* ``'paper'``: the study's unconditional DCGAN, one GAN per class. All
  (seed, class) GANs are one program: ``jax.jit(jax.vmap(step))`` over a
  leading *member* axis ordered seed-major,
  ``member = seed_index * num_classes + class``.
* ``'cond'``: one class-conditional GAN for all classes (projection D with
  spectral norm, DiffAugment, EMA generator); the member axis enumerates seeds.

The step is written for one GAN. Its randomness is derived from
``fold_in(state.rng, state.step)``, so a run restored from a checkpoint draws
the same numbers as an uninterrupted one. Real batches are sampled on device
from a per-class image pool ``[classes, max_count, h, w, 3]`` in [-1, 1].
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from wbc_jax import plots
from wbc_jax import utils
from wbc_jax.gan import diffaug
from wbc_jax.gan import losses
from wbc_jax.gan import models

GAN_KINDS = ('paper', 'cond')

# Order of the named random streams drawn from fold_in(state.rng, state.step).
# Appending is safe; reordering changes every run, so tests pin it.
STEP_STREAMS = ('data', 'd_latent', 'd_augment_real', 'd_augment_fake',
                'd_dropout', 'g_latent', 'g_augment', 'g_dropout')

# Fields that only schedule logging / sampling / checkpointing, or the run
# length: they may change between a run and its resumption.
_SCHEDULE_FIELDS = ('steps', 'log_every', 'sample_every', 'checkpoint_every',
                    'samples_per_class')
# Fields a run may change on resumption: the schedule, and conv_impl, which changes how a
# convolution is computed, not what (a run started on a GPU may finish on a CPU).
_RESUMABLE_FIELDS = _SCHEDULE_FIELDS + ('conv_impl',)


# ----------------------------------------------------------------------------
# Config


def check_gan_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a config that cannot be trained."""
  if config.kind not in GAN_KINDS:
    raise ValueError(f'Unknown GAN kind {config.kind!r}; expected one of {GAN_KINDS}')
  if config.loss_type not in losses.LOSS_TYPES:
    raise ValueError(f'Unknown loss_type {config.loss_type!r}; expected one of {losses.LOSS_TYPES}')
  diffaug.parse_policy(config.diffaug_policy)
  if config.steps < 1 or config.batch_size < 1:
    raise ValueError(f'steps and batch_size must be >= 1, got {config.steps}, {config.batch_size}')
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {config.ema_decay}')
  if config.kind == 'cond' and config.channels < 1:
    raise ValueError(f"kind 'cond' needs channels >= 1, got {config.channels}")
  _check_resolution(config.resolution, 'config.gan.resolution')
  for view, resolution in config.resolution_by_view.items():
    _check_resolution(resolution, f'config.gan.resolution_by_view.{view}')


def _check_resolution(resolution, name: str) -> None:
  resolution = tuple(resolution)
  if resolution and (len(resolution) != 2 or any(int(r) != r or r < 4 or r % 4
                                                 for r in resolution)):
    raise ValueError(f'{name}: expected () or (height, width), each a positive multiple of '
                     f'4, got {resolution!r}')


def resolution_for(config: ml_collections.ConfigDict, view: str,
                   size: Sequence[int]) -> tuple[int, int]:
  """(height, width) a GAN of `view` trains at: config.resolution_by_view[view], else
  config.resolution, else `size` (the classifier's input); () means "not set"."""
  chosen = (tuple(config.resolution_by_view.get(view, ())) or tuple(config.resolution)
            or tuple(size))
  return int(chosen[0]), int(chosen[1])


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


def build_models(config, height: int, width: int, num_classes: int):
  """(generator, discriminator) flax modules for ``config.kind``."""
  impl = config.conv_impl
  if config.kind == 'paper':
    return (models.PaperGenerator(height, width, latent_dim=config.latent_dim, conv_impl=impl),
            models.PaperDiscriminator(conv_impl=impl))
  if config.kind == 'cond':
    return (models.CondGenerator(height, width, num_classes, latent_dim=config.latent_dim,
                                 channels=config.channels, conv_impl=impl),
            models.CondDiscriminator(num_classes, channels=config.channels, conv_impl=impl))
  raise ValueError(f'Unknown GAN kind {config.kind!r}; expected one of {GAN_KINDS}')


def make_optimizers(config):
  """(generator, discriminator) optax transformations."""
  return (optax.adam(config.lr_g, b1=config.b1, b2=config.b2),
          optax.adam(config.lr_d, b1=config.b1, b2=config.b2))


# ----------------------------------------------------------------------------
# State and one train step (for ONE GAN)


@flax.struct.dataclass
class GANState:
  """Everything needed to resume one GAN (or, stacked, many).

  g_batch_stats: the generator's 'batch_stats' collection.
  d_state: the discriminator's non-parameter collections, e.g.
    {'batch_stats': ...} holding BN running statistics ('paper') or the
    spectral-norm power-iteration vectors ('cond').
  ema_g_params: moving average of g_params (equal to g_params when
    config.ema_decay == 0).
  step: int32 [], steps taken. rng: uint32 [2], this GAN's base key.
  """
  g_params: Any
  g_batch_stats: Any
  d_params: Any
  d_state: Any
  g_opt_state: Any
  d_opt_state: Any
  ema_g_params: Any
  step: jnp.ndarray
  rng: jnp.ndarray


def init_gan_state(config, key: jax.Array, height: int, width: int,
                   num_classes: int) -> GANState:
  """Fresh state of one GAN; ``key`` is a raw uint32 [2] key."""
  generator, discriminator = build_models(config, height, width, num_classes)
  g_tx, d_tx = make_optimizers(config)
  g_key, d_key, rng = (jax.random.fold_in(key, i) for i in range(3))
  z = jnp.zeros((2, config.latent_dim), jnp.float32)
  y = jnp.zeros((2,), jnp.int32)
  x = jnp.zeros((2, height, width, 3), jnp.float32)
  g_vars = dict(generator.init(g_key, z, y, train=False))
  d_vars = dict(discriminator.init(d_key, x, y, train=False))
  g_params = g_vars.pop('params')
  d_params = d_vars.pop('params')
  return GANState(
      g_params=g_params,
      g_batch_stats=g_vars.get('batch_stats', {}),
      d_params=d_params,
      d_state=d_vars,
      g_opt_state=g_tx.init(g_params),
      d_opt_state=d_tx.init(d_params),
      ema_g_params=g_params,
      step=jnp.zeros((), jnp.int32),
      rng=rng,
  )


def step_keys(rng: jax.Array, step) -> dict[str, jax.Array]:
  """Named keys of one step: ``fold_in(fold_in(rng, step), i)`` for STEP_STREAMS[i]."""
  base = jax.random.fold_in(rng, step)
  return {name: jax.random.fold_in(base, i) for i, name in enumerate(STEP_STREAMS)}


def _apply_generator(generator, params, batch_stats, z, labels, *, train):
  """-> (images [b, h, w, 3] in [-1, 1], new batch_stats)."""
  variables = {'params': params, 'batch_stats': batch_stats}
  if not train:
    return generator.apply(variables, z, labels, train=False), batch_stats
  images, updates = generator.apply(variables, z, labels, train=True, mutable=['batch_stats'])
  return images, updates['batch_stats']


def _apply_discriminator(discriminator, params, d_state, x, labels, *, train, dropout_key):
  """-> (logits [b], new d_state)."""
  variables = {'params': params, **d_state}
  if not train:
    return discriminator.apply(variables, x, labels, train=False), d_state
  logits, updates = discriminator.apply(
      variables, x, labels, train=True, rngs={'dropout': dropout_key},
      mutable=list(d_state))
  return logits, {**d_state, **updates}


def discriminator_step(state: GANState, real_images: jnp.ndarray, real_labels: jnp.ndarray,
                       *, config, num_classes: int) -> tuple[GANState, dict]:
  """One Adam step of D alone.

  real_images [b, h, w, 3] in [-1, 1], real_labels [b] (fakes are generated
  for the same labels). Returns the state with new d_params / d_state /
  d_opt_state and metrics (d_loss, r1, real_logit_mean, fake_logit_mean,
  d_grad_norm) measured before the update.
  """
  height, width = real_images.shape[1:3]
  generator, discriminator = build_models(config, height, width, num_classes)
  _, d_tx = make_optimizers(config)
  keys = step_keys(state.rng, state.step)
  z = jax.random.normal(keys['d_latent'], (real_images.shape[0], config.latent_dim))
  # G in train mode (batch statistics) like in its own step; its running
  # statistics advance only in the G step, so this pass's updates are dropped.
  fake, _ = _apply_generator(generator, state.g_params, state.g_batch_stats, z,
                             real_labels, train=True)
  fake = jax.lax.stop_gradient(fake)
  real_in = diffaug.diff_augment(real_images, keys['d_augment_real'], config.diffaug_policy)
  fake_in = diffaug.diff_augment(fake, keys['d_augment_fake'], config.diffaug_policy)
  key_real, key_fake = (jax.random.fold_in(keys['d_dropout'], i) for i in range(2))

  def loss_fn(d_params):
    # Real and fake go through D separately, as in the study's Keras loop, so
    # BatchNorm statistics are never mixed across the two.
    real_logits, d_state = _apply_discriminator(
        discriminator, d_params, state.d_state, real_in, real_labels,
        train=True, dropout_key=key_real)
    fake_logits, d_state = _apply_discriminator(
        discriminator, d_params, d_state, fake_in, real_labels,
        train=True, dropout_key=key_fake)
    d_loss = losses.discriminator_loss(real_logits=real_logits, fake_logits=fake_logits,
                                       loss_type=config.loss_type)
    total, r1 = d_loss, jnp.zeros(())
    if config.r1_gamma > 0:
      r1 = losses.r1_penalty(
          logits_fn=lambda x: _apply_discriminator(
              discriminator, d_params, state.d_state, x, real_labels,
              train=True, dropout_key=key_real)[0],
          images=real_in)
      total = total + 0.5 * config.r1_gamma * r1
    metrics = {'d_loss': d_loss, 'r1': r1,
               'real_logit_mean': jnp.mean(real_logits),
               'fake_logit_mean': jnp.mean(fake_logits)}
    return total, (d_state, metrics)

  (_, (d_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.d_params)
  # Finite losses with an infinite gradient would still corrupt the
  # parameters; the run loop's guard sees this norm too.
  metrics['d_grad_norm'] = optax.tree.norm(grads)
  updates, d_opt_state = d_tx.update(grads, state.d_opt_state, state.d_params)
  d_params = optax.apply_updates(state.d_params, updates)
  return state.replace(d_params=d_params, d_state=d_state, d_opt_state=d_opt_state), metrics


def generator_step(state: GANState, labels: jnp.ndarray, *, config, height: int, width: int,
                   num_classes: int) -> tuple[GANState, dict]:
  """One Adam step of G alone, generating one image per label in ``labels`` [b].

  Returns the state with new g_params / g_batch_stats / g_opt_state and
  metrics (g_loss, g_grad_norm) measured before the update.
  """
  generator, discriminator = build_models(config, height, width, num_classes)
  g_tx, _ = make_optimizers(config)
  keys = step_keys(state.rng, state.step)
  z = jax.random.normal(keys['g_latent'], (labels.shape[0], config.latent_dim))

  def loss_fn(g_params):
    fake, g_batch_stats = _apply_generator(generator, g_params, state.g_batch_stats, z,
                                           labels, train=True)
    fake_in = diffaug.diff_augment(fake, keys['g_augment'], config.diffaug_policy)
    # D in train mode (dropout, batch statistics) as in the study's combined
    # Keras model; D's state advances only in the D step, so updates are dropped.
    logits, _ = _apply_discriminator(discriminator, state.d_params, state.d_state, fake_in,
                                     labels, train=True, dropout_key=keys['g_dropout'])
    return losses.generator_loss(fake_logits=logits, loss_type=config.loss_type), g_batch_stats

  (g_loss, g_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.g_params)
  updates, g_opt_state = g_tx.update(grads, state.g_opt_state, state.g_params)
  g_params = optax.apply_updates(state.g_params, updates)
  return (state.replace(g_params=g_params, g_batch_stats=g_batch_stats, g_opt_state=g_opt_state),
          {'g_loss': g_loss, 'g_grad_norm': optax.tree.norm(grads)})


def update_ema(ema_params, params, *, decay: float, step):
  """EMA of params. The effective decay min(decay, (1+step)/(10+step)) lets
  the average forget the random initialisation within the first steps."""
  if decay <= 0:
    return params
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)


def gan_train_step(state: GANState, real_batch: jnp.ndarray, real_labels: jnp.ndarray,
                   *, config, num_classes: int) -> tuple[GANState, dict]:
  """One D step then one G step of ONE GAN.

  real_batch [b, h, w, 3] in [-1, 1]; real_labels [b] int (ignored by the
  'paper' networks). Returns (state with step + 1, metrics of scalars:
  d_loss, g_loss, r1, real_logit_mean, fake_logit_mean, d_grad_norm,
  g_grad_norm).
  """
  height, width = real_batch.shape[1:3]
  state, d_metrics = discriminator_step(state, real_batch, real_labels,
                                        config=config, num_classes=num_classes)
  state, g_metrics = generator_step(state, real_labels, config=config, height=height,
                                    width=width, num_classes=num_classes)
  ema = update_ema(state.ema_g_params, state.g_params, decay=config.ema_decay, step=state.step)
  return state.replace(ema_g_params=ema, step=state.step + 1), {**d_metrics, **g_metrics}


# ----------------------------------------------------------------------------
# Real images on device


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


def train_step_from_pool(state: GANState, class_images, class_counts, class_index,
                         *, config, num_classes: int) -> tuple[GANState, dict]:
  """Sample this GAN's real batch on device, then ``gan_train_step``.

  'paper' draws from class ``class_index``; 'cond' draws class-balanced
  batches (``class_index`` unused).
  """
  key = step_keys(state.rng, state.step)['data']
  if config.kind == 'paper':
    images, labels = sample_class_batch(key, class_images, class_counts, class_index,
                                        config.batch_size)
  else:
    images, labels = sample_balanced_batch(key, class_images, class_counts, config.batch_size)
  return gan_train_step(state, images, labels, config=config, num_classes=num_classes)


def model_config(config) -> ml_collections.FrozenConfigDict:
  """The hashable part of ``config`` that defines the computation.

  Schedule fields are left out, so runs that differ only in length or
  cadence share one compiled program.
  """
  return ml_collections.FrozenConfigDict(
      {k: v for k, v in config.to_dict().items() if k not in _SCHEDULE_FIELDS})


# What init_gan_state reads from the config (optimizer values only shape
# nothing, but are read to build the optimizers).
_INIT_FIELDS = ('kind', 'latent_dim', 'channels', 'lr_g', 'lr_d', 'b1', 'b2')


@functools.partial(jax.jit, static_argnames=('config', 'height', 'width', 'num_classes'))
def _init_one(key, *, config, height, width, num_classes):
  return init_gan_state(config, key, height, width, num_classes)


def init_gan_states(keys, config, *, height: int, width: int, num_classes: int) -> GANState:
  """Fresh states stacked over [members], one per key in ``keys`` [members, 2].

  Each member is initialised by one compiled single-GAN init (the same
  numbers as a vmapped init, which compiles far more slowly on CPU).
  """
  init_config = ml_collections.FrozenConfigDict({k: config[k] for k in _INIT_FIELDS})
  states = [_init_one(key, config=init_config, height=height, width=width,
                      num_classes=num_classes) for key in keys]
  # Stacked on the host: a device stack would compile one program per leaf shape.
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
  return _to_device(stacked)


def _to_device(tree):
  """Committed to one device, like arrays restored from a checkpoint, so that
  fresh and restored states hit the same compiled program."""
  return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def member_state(stacked: GANState, index: int) -> GANState:
  """The ``index``-th GAN of a stacked state (see ``member_layout``)."""
  return _to_device(jax.tree.map(lambda x: np.asarray(x)[index], stacked))


@functools.partial(jax.jit, static_argnames=('config', 'num_classes'), donate_argnums=0)
def train_gans_step(states: GANState, class_images, class_counts, class_index,
                    *, config, num_classes: int) -> tuple[GANState, dict]:
  """``train_step_from_pool`` for every member at once.

  states stacked over [members]; class_index [members]; the image pool is
  shared (not copied per member). Metrics are [members]. ``config`` must be
  hashable (``model_config(config)``); ``states`` is donated.
  """
  step = functools.partial(train_step_from_pool, config=config, num_classes=num_classes)
  return jax.vmap(step, in_axes=(0, None, None, 0))(states, class_images, class_counts,
                                                    class_index)


def member_layout(config, seeds: Sequence[int], num_classes: int):
  """The stacked axis: (keys [members, 2] uint32, class_index [members] int32).

  'paper': members (seed, class) seed-major, key fold_in(PRNGKey(seed), class).
  'cond': one member per seed, key PRNGKey(seed).
  """
  keys, classes = [], []
  for seed in seeds:
    base = jax.random.PRNGKey(seed)
    if config.kind == 'paper':
      for c in range(num_classes):
        keys.append(jax.random.fold_in(base, c))
        classes.append(c)
    else:
      keys.append(base)
      classes.append(0)
  return jnp.stack(keys), jnp.asarray(classes, jnp.int32)


# ----------------------------------------------------------------------------
# Run loop


def _is_time(step: int, every: int, total: int) -> bool:
  """True every ``every`` steps and on the last step."""
  return step == total or (every > 0 and step % every == 0)


def _run_identity(config, images, labels, seeds, num_classes) -> dict:
  """What must not change between a run and its resumption."""
  # The resolution shows in image_shape (the images this run trains on); leaving its fields
  # out keeps runs made before they existed resumable.
  cfg = {k: v for k, v in config.to_dict().items()
         if k not in _RESUMABLE_FIELDS + ('resolution', 'resolution_by_view')}
  digest = hashlib.sha1(np.ascontiguousarray(images, np.float32).tobytes())
  digest.update(np.ascontiguousarray(labels, np.int64).tobytes())
  return {'config': cfg, 'seeds': [int(s) for s in seeds], 'num_classes': int(num_classes),
          'image_shape': list(images.shape[1:]), 'data_sha1': digest.hexdigest()}


_LOGGED = ('d_loss', 'g_loss', 'real_logit_mean', 'fake_logit_mean')


def _truncate_metrics(path: Path, step: int) -> None:
  """Drop lines logged after ``step``: a resumed run logs those steps again."""
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l and json.loads(l)['step'] <= step]
  utils.write_atomic(str(path), ''.join(l + '\n' for l in lines))


def _write_samples(path: Path, state, config, *, height, width, num_classes) -> None:
  """Grid: one row per class, ``samples_per_class`` columns, from seed 0."""
  n = config.samples_per_class
  # Fixed noise, so that grids of successive steps show the same latents.
  images, _ = generate(state, config, num_per_class=[n] * num_classes,
                       key=jax.random.PRNGKey(0), height=height, width=width,
                       num_classes=num_classes)
  plots.save_image_grid(images.reshape(num_classes, n, height, width, 3), path)


def train_gans(config, images: np.ndarray, labels: np.ndarray, *, num_classes: int,
               seeds: Sequence[int], workdir: str | os.PathLike,
               log: Callable[[str], None] = print) -> GANState:
  """Train all GANs of ``config`` on (images [n, h, w, 3] in [0, 1], labels [n]).

  Returns the GANState stacked over the member axis (see ``member_layout``):
  [len(seeds) * num_classes] for 'paper', [len(seeds)] for 'cond'.

  ``workdir`` receives checkpoints/ (one Orbax manager; every
  ``checkpoint_every`` steps and at the end), samples/step_XXXXXX.png,
  metrics.jsonl (per-member values at each log step), run.json (config, seeds
  and data fingerprint; resuming with different ones raises ValueError) and,
  last, DONE.json. A run finds the latest checkpoint and continues from it;
  with DONE.json for ``config.steps`` present it only restores. A non-finite
  loss raises RuntimeError before anything of that step is saved.
  """
  check_gan_config(config)
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels).astype(np.int32)
  class_images, class_counts = make_class_pool(images, labels, num_classes)
  height, width = images.shape[1:3]
  workdir = Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)

  identity = _run_identity(config, images, labels, seeds, num_classes)
  run_file = workdir / 'run.json'
  if run_file.exists():
    previous = json.loads(run_file.read_text())
    if previous != json.loads(json.dumps(identity)):
      raise ValueError(f'{workdir} holds a run with a different config, seeds or data; '
                       f'use another workdir. Stored: {previous}')
  else:
    utils.write_json(str(run_file), identity)

  keys, class_index = member_layout(config, seeds, num_classes)
  static_config = model_config(config)
  state = init_gan_states(keys, config, height=height, width=width, num_classes=num_classes)

  done_file = workdir / 'DONE.json'
  mngr = ocp.CheckpointManager(
      workdir / 'checkpoints',
      # Synchronous saves: the step function donates the state's buffers.
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False))
  try:
    start = mngr.latest_step() or 0
    if start > config.steps:
      raise ValueError(f'{workdir} has a checkpoint at step {start} > config.steps={config.steps}')
    if start:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
      log(f'Restored step {start} from {workdir / "checkpoints"}')
    _truncate_metrics(workdir / 'metrics.jsonl', start)
    if done_file.exists():
      if json.loads(done_file.read_text()).get('step') == config.steps == start:
        log(f'{workdir} is complete ({config.steps} steps)')
        return state
      done_file.unlink()  # the run is being extended

    step_fn = functools.partial(train_gans_step, config=static_config, num_classes=num_classes)
    class_images, class_counts = _to_device((class_images, class_counts))
    t_first, first_done = None, None
    for step in range(start, config.steps):
      state, metrics = step_fn(state, class_images, class_counts, class_index)
      metrics = jax.device_get(metrics)
      for name, value in metrics.items():
        bad = ~np.isfinite(value)
        if bad.any():
          raise RuntimeError(
              f'Non-finite {name} at step {step} (0-based; members '
              f'{np.flatnonzero(bad).tolist()}); nothing of this step was saved, '
              f'last checkpoint: step {mngr.latest_step()}')
      done = step + 1
      if t_first is None:  # rates exclude the first step's compilation
        t_first, first_done = time.perf_counter(), done
      if _is_time(done, config.log_every, config.steps):
        elapsed = time.perf_counter() - t_first
        rate = (done - first_done) / elapsed if done > first_done else float('nan')
        eta = (config.steps - done) / rate if rate > 0 else float('nan')
        shown = _LOGGED + (('r1',) if config.r1_gamma > 0 else ())
        # Mean ± spread over the stacked GANs; per-GAN values go to metrics.jsonl.
        summary = '  '.join(f'{k} {np.mean(metrics[k]):+.4f}±{np.std(metrics[k]):.4f}'
                            for k in shown)
        speed = f'{rate:.3f} steps/s  ETA {utils.format_duration(eta)}' if rate > 0 else 'compiled'
        log(f'step {done}/{config.steps}  {summary}  {speed}')
        with open(workdir / 'metrics.jsonl', 'a') as f:
          f.write(json.dumps({'step': done, **{k: np.asarray(v).tolist()
                                               for k, v in metrics.items()}}) + '\n')
      if config.sample_every > 0 and _is_time(done, config.sample_every, config.steps):
        _write_samples(workdir / 'samples' / f'step_{done:06d}.png', state, config,
                       height=height, width=width, num_classes=num_classes)
      if _is_time(done, config.checkpoint_every, config.steps):
        mngr.save(done, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    utils.write_json(str(done_file), {'step': config.steps, 'members': int(keys.shape[0]),
                                   'time': time.strftime('%Y-%m-%dT%H:%M:%S')})
    return state
  finally:
    mngr.close()


# ----------------------------------------------------------------------------
# Generation


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


def generate(state: GANState, config, *, num_per_class: Mapping[int, int] | Sequence[int],
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
  generator, _ = build_models(config, height, width, num_classes)
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
