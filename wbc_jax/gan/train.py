"""Training GANs for augmentation: the state, the train step of one GAN, the programs that
run many at once, and the run loop.

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
from a per-class image pool ``[classes, max_count, h, w, 3]`` in [-1, 1]
(``wbc_jax.gan.data``). ``make_programs`` builds the jitted programs the way
``wbc_jax.train.make_programs`` builds the classifier's: vmap over the members, jit,
donation. The networks are ``wbc_jax.gan.models``'s, sampling ``wbc_jax.gan.sample``'s,
and the config's fields and defaults ``configs/ablation.py``'s ``gan_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from wbc_jax import plots
from wbc_jax import utils
from wbc_jax.gan import data
from wbc_jax.gan import diffaug
from wbc_jax.gan import losses
from wbc_jax.gan import models
from wbc_jax.gan import sample

# Order of the named random streams drawn from fold_in(state.rng, state.step).
# Appending is safe; reordering changes every run, so tests pin it.
STEP_STREAMS = ('data', 'd_latent', 'd_augment_real', 'd_augment_fake',
                'd_dropout', 'g_latent', 'g_augment', 'g_dropout')

# Fields that only schedule logging / sampling / checkpointing, or the run length: they
# shape no program, and may change between a run and its resumption.
SCHEDULE_FIELDS = ('steps', 'log_every', 'sample_every', 'checkpoint_every',
                   'samples_per_class')
# Fields a run may change on resumption: the schedule, and conv_impl, which changes how a
# convolution is computed, not what (a run started on a GPU may finish on a CPU); the
# ablation's choice of resolution shows in the run's image shape instead.
_RESUMABLE_FIELDS = SCHEDULE_FIELDS + ('conv_impl', 'resolution', 'resolution_by_view')


# ----------------------------------------------------------------------------
# Config


def check_gan_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a config that cannot be trained."""
  if config.kind not in models.GAN_KINDS:
    raise ValueError(f'Unknown GAN kind {config.kind!r}; expected one of {models.GAN_KINDS}')
  if config.loss_type not in losses.LOSS_TYPES:
    raise ValueError(f'Unknown loss_type {config.loss_type!r}; expected one of {losses.LOSS_TYPES}')
  diffaug.parse_policy(config.diffaug_policy)
  if config.steps < 1 or config.batch_size < 1:
    raise ValueError(f'steps and batch_size must be >= 1, got {config.steps}, {config.batch_size}')
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {config.ema_decay}')
  if config.kind == 'cond' and config.channels < 1:
    raise ValueError(f"kind 'cond' needs channels >= 1, got {config.channels}")


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
  generator, discriminator = models.build_models(config, height, width, num_classes)
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
  generator, discriminator = models.build_models(config, height, width, num_classes)
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
  generator, discriminator = models.build_models(config, height, width, num_classes)
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


def train_step_from_pool(state: GANState, class_images, class_counts, class_index,
                         *, config, num_classes: int) -> tuple[GANState, dict]:
  """Sample this GAN's real batch on device, then ``gan_train_step``.

  'paper' draws from class ``class_index``; 'cond' draws class-balanced
  batches (``class_index`` unused).
  """
  key = step_keys(state.rng, state.step)['data']
  if config.kind == 'paper':
    images, labels = data.sample_class_batch(key, class_images, class_counts, class_index,
                                             config.batch_size)
  else:
    images, labels = data.sample_balanced_batch(key, class_images, class_counts,
                                                config.batch_size)
  return gan_train_step(state, images, labels, config=config, num_classes=num_classes)


@dataclasses.dataclass
class GANPrograms:
  """The jitted programs of one GAN config at one image size (compiled once per shape).

    init(key [2])                                   -> GANState of one GAN
    train_step(states, class_images, class_counts, class_index [members])
                                                    -> states, metrics [members]
  train_step is `train_step_from_pool` vmapped over the stacked members (`member_layout`);
  the image pool (`data.make_class_pool`) is shared, not copied per member, and the states
  are donated. Each member is initialised by the one-GAN init (the same numbers as a vmapped
  init, which compiles far more slowly on CPU) and stacked on the host (`init_gan_states`).
  """
  init: Callable
  train_step: Callable


def make_programs(config, *, height: int, width: int, num_classes: int) -> GANPrograms:
  """The programs of `config` (`config.gan`'s fields) for images of height x width."""
  config = ml_collections.FrozenConfigDict(config)  # the programs close over it
  init = jax.jit(functools.partial(init_gan_state, config, height=height, width=width,
                                   num_classes=num_classes))
  step = jax.jit(jax.vmap(functools.partial(train_step_from_pool, config=config,
                                            num_classes=num_classes),
                          in_axes=(0, None, None, 0)), donate_argnums=0)
  return GANPrograms(init=init, train_step=step)


_PROGRAMS: dict = {}


def programs_for(config, *, height: int, width: int, num_classes: int) -> GANPrograms:
  """make_programs, built once per computation in this process: runs that differ only in
  their schedule (length, cadences; `SCHEDULE_FIELDS`) share the compiled programs."""
  computation = {k: v for k, v in config.to_dict().items() if k not in SCHEDULE_FIELDS}
  key = (json.dumps(computation, sort_keys=True, default=list), height, width, num_classes)
  if key not in _PROGRAMS:
    if len(_PROGRAMS) >= 4:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[key] = make_programs(config, height=height, width=width, num_classes=num_classes)
  return _PROGRAMS[key]


def init_gan_states(keys, config, *, height: int, width: int, num_classes: int) -> GANState:
  """Fresh states stacked over [members], one per key in ``keys`` [members, 2]."""
  init = programs_for(config, height=height, width=width, num_classes=num_classes).init
  states = [init(key) for key in keys]
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
  cfg = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_FIELDS}
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
  images, _ = sample.generate(state, config, num_per_class=[n] * num_classes,
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
  class_images, class_counts = data.make_class_pool(images, labels, num_classes)
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
  programs = programs_for(config, height=height, width=width, num_classes=num_classes)
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

    class_images, class_counts = _to_device((class_images, class_counts))
    t_first, first_done = None, None
    for step in range(start, config.steps):
      state, metrics = programs.train_step(state, class_images, class_counts, class_index)
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
