"""Classifier training: S seeds at once, one jitted program, Orbax-checkpointed.

The train state, `create_train_state` and `train_step` are written for ONE seed; the
seed axis is added by `jax.vmap` (purejaxrl-style), so each seed has its own
initialisation, dropout, batch statistics and (through the input pipeline) its own data
order and augmentation draws. Randomness inside a step is
`fold_in(state.rng, state.step)`, so a resumed run draws what an uninterrupted one does.

The vmapped seed axis is split over the devices of `config.mesh` (`wbc_jax.sharding`):
the programs are jitted with declared shardings, the state is created and restored
already split, and each process feeds the seeds that its devices hold.

Each epoch evaluates the seeds exactly and keeps each seed's parameters chosen on validation
(`wbc_jax.evaluation`); the test split is evaluated each epoch only for the curves.

The strong-baseline recipe (`configs/baseline.py`) adds, each a config field: inputs
standardised per channel with the training images' statistics (kept in the state, so
prediction applies the same), augmentation inside the jitted step (`wbc_jax.augment`),
class-balanced sampling, label smoothing, a logit-adjusted loss, AdamW with warm-up and
cosine decay, an exponential moving average of the weights, and test-time augmentation
(the mean over the 8 flips and rotations by 90 degrees) in every evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from wbc_jax import augment as augment_lib
from wbc_jax import evaluation
from wbc_jax import input_pipeline as ip
from wbc_jax import metrics as metrics_lib
from wbc_jax import models
from wbc_jax import plots
from wbc_jax import sharding
from wbc_jax import training_set
from wbc_jax import utils

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything needed to resume one seed's training (vmapped: a leading seed axis)."""
  step: jax.Array          # int32 []
  epoch: jax.Array         # int32 [], epochs completed
  params: PyTree
  batch_stats: PyTree      # {} for models without batch norm
  opt_state: PyTree
  rng: jax.Array           # uint32 [2], the seed's training key
  best_params: PyTree
  best_batch_stats: PyTree
  best_score: jax.Array    # float32 [], the selection score of best_*; -inf before any
  best_epoch: jax.Array    # int32 [], 0 before the first evaluation
  ema_params: PyTree       # {} unless train.ema_decay > 0
  ema_batch_stats: PyTree  # {} unless train.ema_decay > 0 and the model has batch norm
  input_mean: jax.Array    # float32 [3]: images are standardised as (x - mean) / std;
  input_std: jax.Array     # 0 and 1 (no change) unless train.standardize
  class_log_bias: jax.Array  # float32 [C]: predictions are p * exp(bias), renormalised;
                             # `training_set.prior_log_bias` with train.prior_correction

  def eval_variables(self) -> tuple[PyTree, PyTree]:
    """The (params, batch_stats) evaluated each epoch: the moving average when kept."""
    if self.ema_params:
      return self.ema_params, (self.ema_batch_stats if self.batch_stats else self.batch_stats)
    return self.params, self.batch_stats

  @property
  def predict_consts(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What `predict_step` needs besides the weights: (mean, std, class_log_bias)."""
    return self.input_mean, self.input_std, self.class_log_bias


SCHEDULES = ('constant', 'warmup_cosine')


def make_optimizer(train_config, total_steps: int = 1) -> optax.GradientTransformation:
  """The optimizer of `config.train`; total_steps sets the length of a decaying schedule
  (its state's structure does not depend on it, so restoring may pass the default)."""
  name, lr = train_config.optimizer, train_config.learning_rate
  schedule = train_config.schedule
  if schedule not in SCHEDULES:
    raise ValueError(f"config.train.schedule: unknown schedule {schedule!r}; expected one of "
                     f"{', '.join(SCHEDULES)}.")
  if schedule == 'warmup_cosine':
    warmup = min(int(train_config.warmup_steps), max(total_steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=lr * train_config.final_lr_fraction)
  if name == 'adam':
    # eps=1e-7 is Keras' default, which the paper used.
    return optax.adam(lr, eps=1e-7)
  if name == 'adamw':
    return optax.adamw(lr, eps=1e-7, weight_decay=train_config.weight_decay)
  if name == 'sgd':
    return optax.sgd(lr, momentum=0.9)
  raise ValueError(f"config.train.optimizer: unknown optimizer {name!r}; "
                   "expected adam, adamw or sgd.")


def create_train_state(key: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, int, int], ema: bool = False,
                       num_classes: int | None = None) -> TrainState:
  """Initialises one seed. key: the seed's PRNG key [2]; num_classes: the model's (default:
  its `num_classes` attribute)."""
  init_key, train_key = jax.random.split(key)
  variables = model.init({'params': init_key, 'dropout': init_key},
                         jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  channels = image_shape[-1]
  return TrainState(
      step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
      params=params, batch_stats=batch_stats, opt_state=tx.init(params), rng=train_key,
      best_params=params, best_batch_stats=batch_stats,
      best_score=jnp.full((), -jnp.inf, jnp.float32), best_epoch=jnp.zeros((), jnp.int32),
      ema_params=params if ema else {}, ema_batch_stats=batch_stats if ema else {},
      input_mean=jnp.zeros((channels,), jnp.float32),
      input_std=jnp.ones((channels,), jnp.float32),
      class_log_bias=jnp.zeros((num_classes or model.num_classes,), jnp.float32))


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The static choices of the train step (hashable: part of the jitted program).

  augment: the in-step augmentation (None: none here; the tf.data one may have run).
  label_smoothing: the target's mass spread evenly over the classes.
  ema_decay: the moving average's decay (0: none kept).
  """
  augment: augment_lib.AugmentSpec | None = None
  label_smoothing: float = 0.0
  ema_decay: float = 0.0

  @classmethod
  def from_config(cls, config, *, augment: bool) -> 'StepOptions':
    tc, aug = config.train, config.augment
    in_step = augment and aug.impl == 'jax'
    return cls(augment=augment_lib.AugmentSpec.from_config(aug) if in_step else None,
               label_smoothing=float(tc.label_smoothing), ema_decay=float(tc.ema_decay))


def _standardize(images: jax.Array, consts: tuple[jax.Array, ...]) -> jax.Array:
  mean, std = consts[:2]
  return (images - mean) / std


def _apply(model, params, batch_stats, images, *, train, rng=None):
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  if train:
    mutable = ['batch_stats'] if batch_stats else False
    out = model.apply(variables, images, train=True, rngs={'dropout': rng}, mutable=mutable)
    logits, new_vars = out if batch_stats else (out, {})
    return logits, new_vars.get('batch_stats', batch_stats)
  return model.apply(variables, images, train=False), batch_stats


def train_step(state: TrainState, batch: dict[str, jax.Array], consts: dict[str, jax.Array], *,
               model: nn.Module, tx: optax.GradientTransformation,
               options: StepOptions = StepOptions()) -> tuple[TrainState, dict]:
  """One optimizer step of one seed.

  batch: {'image': float32 [B, H, W, 3] in [0, 1], 'label': int32 [B]};
  consts: `training_set.loss_constants` ({'class_weights': [C], 'logit_offset': [C]}).
  Returns the new state and {'loss', 'correct', 'count'} summed over the batch.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  labels = batch['label']
  weights = consts['class_weights'][labels]
  images = batch['image']
  if options.augment is not None:
    # A key of its own: dropout draws the same numbers with the augmentation on or off.
    images = augment_lib.augment_batch(images, jax.random.fold_in(rng, 0xA06), options.augment)
  images = _standardize(images, state.predict_consts)

  def loss_fn(params):
    logits, new_bs = _apply(model, params, state.batch_stats, images, train=True, rng=rng)
    adjusted = logits + consts['logit_offset']
    if options.label_smoothing > 0:
      targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]),
                                    options.label_smoothing)
      ce = optax.softmax_cross_entropy(adjusted, targets)
    else:
      ce = optax.softmax_cross_entropy_with_integer_labels(adjusted, labels)
    # Keras' class_weight semantics: a weighted mean over the batch with weights
    # normalised by the batch size (not by their sum).
    return jnp.mean(ce * weights), (logits, new_bs, ce)

  grads, (logits, new_bs, ce) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                            opt_state=opt_state)
  if options.ema_decay > 0:
    # The decay ramps up as (1 + t) / (10 + t) (TensorFlow's num_updates rule), so the
    # average is not dominated by the initial weights in a run of a few thousand steps.
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(options.ema_decay, (1 + t) / (10 + t))
    ema = lambda old, new: jax.tree.map(lambda o, n: decay * o + (1 - decay) * n, old, new)
    new_state = new_state.replace(ema_params=ema(state.ema_params, params),
                                  ema_batch_stats=ema(state.ema_batch_stats, new_bs))
  metrics = {'loss': jnp.sum(ce), 'correct': jnp.sum(jnp.argmax(logits, -1) == labels),
             'count': jnp.asarray(labels.shape[0], jnp.int32)}
  return new_state, metrics


def predict_step(params: PyTree, batch_stats: PyTree, images: jax.Array,
                 consts: tuple[jax.Array, jax.Array, jax.Array], *, model: nn.Module,
                 tta: bool = False) -> jax.Array:
  """Class probabilities of one seed. images [B, H, W, 3] in [0, 1] -> [B, C].

  consts: `TrainState.predict_consts`, (mean [3], std [3]) of the standardisation and the
  prior correction's class_log_bias [C]. tta: the mean of the probabilities of the 8 flips
  and rotations by 90 degrees (square images), then the prior correction.
  """
  if tta:
    if images.shape[1] != images.shape[2]:
      raise ValueError(f'config.train.tta needs square images, got {images.shape[1]}x'
                       f'{images.shape[2]}.')
    views = augment_lib.d4_views(images)  # [8, B, H, W, 3]
    logits, _ = _apply(model, params, batch_stats,
                       _standardize(views.reshape(-1, *images.shape[1:]), consts), train=False)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    probs = probs.reshape(8, images.shape[0], -1).mean(axis=0)
  else:
    logits, _ = _apply(model, params, batch_stats, _standardize(images, consts), train=False)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  # The prior correction, p * exp(bias) renormalised (an identity when bias is 0).
  adjusted = probs * jnp.exp(consts[2])
  return adjusted / jnp.sum(adjusted, axis=-1, keepdims=True)


@dataclasses.dataclass
class Programs:
  """The jitted, seed-vmapped programs of one model (compiled once per shape) and their mesh.

  Shardings (see `wbc_jax.sharding`): every state leaf [S, ...] and every per-seed output
  over 'seed'; training batches [S, B, ...] over ('seed', 'data'); evaluation images
  [B, H, W, 3] and class weights replicated (numpy is fine for those). Pass the seed keys
  and batches as global arrays (`sharding.put`), the state as these programs return it.
    init(keys [S, 2])                                 -> state
    train_step(state, batch, consts)                  -> state, {'loss', 'correct', 'count': [S]}
      (consts: `training_set.loss_constants`, the same for every seed)
    predict(params, batch_stats, images [B, H, W, 3], consts ([S, 3], [S, 3], [S, C]))
                                                      -> probabilities [S, B, C]
    select_best(state, score [S])                     -> state
  The state is donated to train_step and select_best.
  """
  init: Callable
  train_step: Callable
  predict: Callable
  select_best: Callable
  mesh: jax.sharding.Mesh
  seed_sharding: jax.sharding.NamedSharding
  batch_sharding: jax.sharding.NamedSharding


def make_programs(model: nn.Module, tx: optax.GradientTransformation,
                  image_shape: tuple[int, int, int],
                  mesh: jax.sharding.Mesh | None = None, *,
                  options: StepOptions = StepOptions(), tta: bool = False) -> Programs:
  """The seed-vmapped programs on `mesh` (default: one device, a plain jit's layout)."""
  mesh = sharding.single_device_mesh() if mesh is None else mesh
  by_seed, by_seed_data = sharding.seed_sharding(mesh), sharding.batch_sharding(mesh)
  everywhere = sharding.replicated(mesh)
  # One sharding per argument is a pytree prefix: it applies to every leaf of the state.
  init = jax.jit(jax.vmap(functools.partial(create_train_state, model=model, tx=tx,
                                            image_shape=image_shape,
                                            ema=options.ema_decay > 0)),
                 in_shardings=by_seed, out_shardings=by_seed)
  step = jax.jit(jax.vmap(functools.partial(train_step, model=model, tx=tx, options=options),
                          in_axes=(0, 0, None)),
                 in_shardings=(by_seed, by_seed_data, everywhere),
                 out_shardings=(by_seed, by_seed), donate_argnums=0)
  vmapped_predict = jax.vmap(functools.partial(predict_step, model=model, tta=tta),
                             in_axes=(0, 0, None, 0))

  def predict_sharded(params, batch_stats, images, consts):
    if mesh.shape[sharding.DATA] > 1:
      # The eval batch arrives whole on every device (numpy, any batch size); each
      # device along 'data' keeps its rows, so the seeds' predictions split the work.
      images = jax.lax.with_sharding_constraint(images, sharding.data_sharding(mesh))
    return vmapped_predict(params, batch_stats, images, consts)

  predict = jax.jit(predict_sharded, in_shardings=(by_seed, by_seed, everywhere, by_seed),
                    out_shardings=by_seed)
  select = jax.jit(jax.vmap(evaluation.select_best), in_shardings=(by_seed, by_seed),
                   out_shardings=by_seed, donate_argnums=0)
  return Programs(init, step, predict, select, mesh, by_seed, by_seed_data)


def seed_keys(seeds) -> jax.Array:
  return jax.vmap(jax.random.PRNGKey)(jnp.asarray(list(seeds), jnp.uint32))


_PROGRAMS: dict = {}


def _cached_programs(key, build: Callable[[bool], Programs], tta: bool) -> Programs:
  """make_programs, built once per (settings, tta) in this process; few entries are kept."""
  if (key, tta) not in _PROGRAMS:
    if len(_PROGRAMS) >= 4:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[(key, tta)] = build(tta)
  return _PROGRAMS[(key, tta)]


class NonFiniteLossError(FloatingPointError):
  pass


def train_and_evaluate(config, workdir: str, *, examples: ip.Examples, split: ip.Split,
                       model_name: str, augment: bool, extra=None, log: Callable = print) -> dict:
  """Trains S seeds of one (model, regime, split) and writes its files to `workdir`.

  Resumes from the latest checkpoint in `workdir/checkpoints`. Returns results.json's
  contents. `extra` is (uint8 images, labels) added to the training split only.

  The seeds are spread over the devices of `config.mesh` (see `wbc_jax.sharding`):
  config.num_seeds must be a multiple of the mesh's seed axis and train.batch_size of
  its data axis, else a ValueError names the fields and the device count. With several
  processes every process calls this with the same arguments and gets the same
  results; process 0 alone writes the files (the checkpoints are written by all,
  through Orbax).
  """
  tc = config.train
  seeds = [config.seed + i for i in range(config.num_seeds)]
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_divisible(len(seeds), tc.batch_size, mesh)
  write = sharding.is_primary()
  os.makedirs(workdir, exist_ok=True)
  if write:
    utils.write_atomic(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  num_classes = len(examples.class_names)
  image_shape = tuple(examples.images.shape[1:])
  fit_index = training_set.fit_indices(split, tc)
  train_x, train_y = examples.images[fit_index], examples.labels[fit_index]
  model = models.get_model(model_name, num_classes=num_classes, conv_impl=tc.conv_impl)
  augment_lib.check_impl(config.augment.impl, config.augment)
  options = StepOptions.from_config(config, augment=augment)
  select = tc.select
  evaluation.selection_score(select, {'epoch': 0, 'val_acc': [], 'val_bacc': [], 'val_loss': []})
  sampling = tc.sampling
  n_train = len(train_y) + (0 if extra is None else len(extra[1]))
  all_train_y = train_y if extra is None else np.concatenate([train_y, extra[1]])
  steps = ip.epoch_steps(tc, num_real=len(train_y), num_extra=n_train - len(train_y))
  tx = make_optimizer(tc, total_steps=tc.epochs * steps)
  # The folds of a cross-validation share every shape and setting: one compilation serves
  # them all (the key holds everything the programs close over).
  program_key = (model_name, num_classes, tc.to_json(), image_shape, mesh.shape_tuple,
                 tuple(d.id for d in mesh.devices.flat), options, steps)
  programs_for = lambda tta: _cached_programs(program_key, lambda tta: make_programs(
      model, tx, image_shape, mesh, options=options, tta=tta), tta)
  programs = programs_for(bool(tc.tta))
  # This process builds the batches of the seeds its devices hold, and only those: a
  # seed's order and augmentation draws do not depend on the seeds beside it.
  local_rows = sharding.local_seed_rows(programs.seed_sharding, len(seeds))
  local_seeds = [seeds[i] for i in local_rows]

  consts = training_set.loss_constants(all_train_y, num_classes, tc)

  keys = sharding.put(np.asarray(seed_keys(seeds)), programs.seed_sharding)
  history: list[dict] = []
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  start_epoch = 0
  if manager.latest_step() is not None:
    # Restored straight into the mesh's layout, whatever the layout it was saved from.
    abstract = sharding.abstract_like(jax.eval_shape(programs.init, keys), programs.seed_sharding)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state, history = restored['state'], restored['meta']['history']
    start_epoch = int(sharding.to_host(state.epoch)[0])
    log(f'  resumed from epoch {start_epoch} ({workdir})')
  else:
    state = programs.init(keys)
    put = lambda v: sharding.put(np.tile(v, (len(seeds), 1)), programs.seed_sharding)
    if tc.standardize:
      # The real training images' statistics only: validation and test images never
      # shape the input; kept in the state, so a restored run standardises the same.
      mean, std = ip.channel_stats(train_x)
      state = state.replace(input_mean=put(mean), input_std=put(std))
    if tc.prior_correction:
      # The real training labels' prior (synthetic images would flatten it).
      state = state.replace(class_log_bias=put(
          training_set.prior_log_bias(train_y, num_classes, tc.prior_correction)))

  # Validation is needed every epoch (model selection); the train and test curves are
  # optional, and evaluating the training images costs as much as a third of an epoch.
  eval_sets = {'val': (examples.images[split.val], examples.labels[split.val])}
  if tc.eval_train_every_epoch:
    eval_sets = {'train': (train_x, train_y), **eval_sets}
  if tc.log_test_every_epoch:
    eval_sets['test'] = (examples.images[split.test], examples.labels[split.test])

  # The curves' predictions: with train.curve_tta False, the plain (one-view) program, 8x
  # cheaper than test-time augmentation; the final evaluation below always uses `tta`.
  curve_programs = programs
  if tc.tta and not tc.curve_tta:
    curve_programs = programs_for(False)

  tb = utils.tensorboard_writers(workdir, seeds) if write else []
  t_start = time.time()
  for epoch in range(start_epoch, tc.epochs):
    t0 = time.time()
    step_metrics = []
    batches = ip.train_batches(train_x, train_y, seeds=local_seeds, epoch=epoch,
                               batch_size=tc.batch_size, aug=config.augment,
                               augment=augment and options.augment is None,
                               extra=extra, max_steps=steps, sampling=sampling, steps=steps)
    for batch in batches:
      batch = {k: sharding.put_seed_rows(v, local_rows, programs.batch_sharding, len(seeds))
               for k, v in batch.items()}
      state, m = programs.train_step(state, batch, consts)
      step_metrics.append(m)
    m = jax.tree.map(lambda *xs: np.stack(xs), *sharding.to_host(step_metrics))
    bad = ~np.isfinite(m['loss'])
    if bad.any():
      first = int(np.argwhere(bad.any(axis=1))[0, 0])
      raise NonFiniteLossError(
          f'{workdir}: non-finite training loss at epoch {epoch + 1}, step '
          f'{epoch * steps + first + 1} (seeds {[s for s, b in zip(seeds, bad[first]) if b]}); '
          'the last checkpoint is kept.')
    train_secs = time.time() - t0
    state = state.replace(epoch=state.epoch + 1)
    row = {'epoch': epoch + 1,
           'train_aug_loss': (m['loss'].sum(0) / m['count'].sum(0)).tolist(),
           'train_aug_acc': (m['correct'].sum(0) / m['count'].sum(0)).tolist()}
    row.update(evaluation.curve_metrics(curve_programs.predict, *state.eval_variables(),
                                        state.predict_consts, eval_sets,
                                        batch_size=tc.eval_batch_size, num_classes=num_classes))
    state = programs.select_best(
        state, sharding.put(evaluation.selection_score(select, row), programs.seed_sharding))
    epoch_secs = time.time() - t0
    row.update(seconds=epoch_secs, train_images_per_second=steps * tc.batch_size * len(seeds)
               / max(train_secs, 1e-9))
    history.append(row)
    utils.write_scalars(tb, row)
    done_here = epoch + 1 - start_epoch
    eta = (time.time() - t_start) / done_here * (tc.epochs - epoch - 1)
    log(f'  epoch {epoch + 1:3d}/{tc.epochs}  {epoch_secs:5.1f}s  '
        f'{row["train_images_per_second"]:6.1f} img/s  '
        f'loss {np.mean(row["train_aug_loss"]):.3f}  '
        f'train {np.mean(row.get("train_acc", row["train_aug_acc"])):.3f}  '
        f'val {np.mean(row["val_acc"]):.3f} (bal. {np.mean(row["val_bacc"]):.3f})  '
        f'ETA {utils.format_duration(eta)}')
    last = epoch + 1 == tc.epochs
    if last or (epoch + 1) % tc.checkpoint_every_epochs == 0:
      manager.save(epoch + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({'history': history})))
  manager.wait_until_finished()
  manager.close()
  for w in tb:
    w.close()
  if write:
    utils.write_jsonl(os.path.join(workdir, 'metrics.jsonl'), history)

  # Final evaluation of each seed's selected parameters.
  eval_final = {'train': (train_x, train_y),
                'val': (examples.images[split.val], examples.labels[split.val]),
                'test': (examples.images[split.test], examples.labels[split.test])}
  best_epoch, best_score = sharding.to_host((state.best_epoch, state.best_score))
  by_epoch = {r['epoch']: r for r in history}
  results = {'model': model_name, 'split': split.name, 'seeds': seeds,
             'best_epoch': best_epoch.tolist(),
             'best_val_accuracy': [float(by_epoch[int(e)]['val_acc'][i])
                                   for i, e in enumerate(best_epoch)],
             'select': select, 'best_score': best_score.tolist(), 'fit_on': tc.fit_on,
             'prior_correction': float(tc.prior_correction),
             'num_params': models.count_params(state.params) // len(seeds),
             'n_train_real': len(train_y), 'n_train_extra': 0 if extra is None else len(extra[1]),
             'class_names': list(examples.class_names),
             'train_seconds': float(sum(r['seconds'] for r in history))}
  # What test-time augmentation and the moving average each bought, measured on the same
  # trained seeds: the test predictions without one of them (no retraining needed).
  variants = {}
  if tc.tta:
    variants['no_tta'] = (programs_for(False).predict, state.best_params, state.best_batch_stats)
  if options.ema_decay > 0 and select == 'last':
    variants['no_ema'] = (programs.predict, state.params, state.batch_stats)
  splits, test_variants, arrays = evaluation.evaluate_selected(
      programs.predict, state, eval_final, variants, batch_size=tc.eval_batch_size,
      class_names=examples.class_names,
      image_ids={n: examples.image_ids[getattr(split, n)] for n in ('val', 'test')})
  results.update(splits=splits, majority_baseline=metrics_lib.majority_baseline(
      train_y, examples.labels[split.test], num_classes), test_variants=test_variants)
  if write:
    np.savez(os.path.join(workdir, 'predictions.npz'), **arrays)
    plots.plot_run(workdir, history, results, examples.class_names)
  return results
