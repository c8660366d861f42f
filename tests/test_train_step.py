"""The classifier's train step and optimisers as units, on a linear model: class weighting,
SGD's momentum, AdamW's decoupled weight decay, per-seed selection of the best epoch, and
the score that selection reads in a training run."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import config_sections
from wbc_jax import evaluation
from wbc_jax import input_pipeline as ip
from wbc_jax import train
from wbc_jax import training_set

NUM_CLASSES = 3


class _Linear(nn.Module):
  """Logits linear in the pixels: [b, h, w, 3] -> [b, num_classes]."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _state(tx, seed=0):
  return train.create_train_state(jax.random.PRNGKey(seed), model=_Linear(), tx=tx,
                                  image_shape=(2, 2, 3))


def _batch(labels):
  images = np.random.default_rng(0).uniform(size=(len(labels), 2, 2, 3)).astype(np.float32)
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels, jnp.int32)}


def test_class_weights_are_inverse_class_frequencies():
  labels = np.array([0, 0, 0, 1])  # class 2 absent
  # Keras/scikit-learn 'balanced': n / (classes * count); an absent class weighs nothing.
  np.testing.assert_allclose(training_set.class_weights_for(labels, 3, True), [4 / 9, 4 / 3, 0],
                             rtol=1e-6)
  np.testing.assert_array_equal(training_set.class_weights_for(labels, 3, False), [1, 1, 1])
  tc = config_sections.section('train', class_weighting=True)
  np.testing.assert_allclose(training_set.loss_constants(labels, 3, tc)['class_weights'],
                             [4 / 9, 4 / 3, 0], rtol=1e-6)


def test_train_step_weights_each_example_by_its_class():
  """One plain gradient step (SGD, rate 1) moves the parameters by minus the gradient of the
  class-weighted loss: the sum of weight * cross-entropy over the batch, divided by the
  batch size (Keras's class_weight), not by the sum of the weights."""
  labels = np.array([0, 0, 0, 1])
  batch = _batch(labels)
  weights = jnp.asarray([0.5, 3.0, 7.0])
  consts = {'class_weights': weights, 'logit_offset': jnp.zeros(NUM_CLASSES)}
  tx = optax.sgd(1.0)
  state = _state(tx)
  new_state, metrics = train.train_step(state, batch, consts, model=_Linear(), tx=tx)

  def weighted_loss(params):
    logits = _Linear().apply({'params': params}, batch['image'], train=False)
    ce = -jax.nn.log_softmax(logits)[np.arange(4), labels]
    return jnp.sum(weights[labels] * ce) / 4, ce

  grads, ce = jax.grad(weighted_loss, has_aux=True)(state.params)
  expected = jax.tree.map(lambda p, g: p - g, state.params, grads)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The logged loss is the plain cross-entropy, summed: comparable across weightings.
  np.testing.assert_allclose(metrics['loss'], ce.sum(), rtol=1e-5)
  unweighted, _ = train.train_step(state, batch, {**consts, 'class_weights': jnp.ones(3)},
                                   model=_Linear(), tx=tx)
  assert not np.allclose(unweighted.params['Dense_0']['kernel'],
                         new_state.params['Dense_0']['kernel'], atol=1e-4)


def _updates(train_config, grads, params):
  tx = train.make_optimizer(config_sections.section('train', **train_config))
  state = tx.init(params)
  out = []
  for g in grads:
    update, state = tx.update(g, state, params)
    out.append(np.asarray(update))
  return out


def test_sgd_has_momentum_0_9():
  params = jnp.array([1.0, -2.0])
  g1, g2 = jnp.array([0.5, 0.25]), jnp.array([-1.0, 1.0])
  u1, u2 = _updates({'optimizer': 'sgd', 'learning_rate': 0.1}, [g1, g2], params)
  np.testing.assert_allclose(u1, -0.1 * g1, rtol=1e-6)
  np.testing.assert_allclose(u2, -0.1 * (g2 + 0.9 * g1), rtol=1e-6)


def test_adamw_decays_the_weights_and_adam_does_not():
  params = jnp.array([1.0, -2.0, 4.0])
  g = jnp.array([0.5, 0.25, -1e-3])
  # At the first step Adam's bias-corrected moments are g and g**2: the step is
  # lr * g / (|g| + eps), whose size is the learning rate whatever the gradient's.
  adam_step = -0.01 * g / (jnp.abs(g) + 1e-7)
  (adam,) = _updates({'optimizer': 'adam', 'learning_rate': 0.01}, [g], params)
  np.testing.assert_allclose(adam, adam_step, rtol=1e-5, atol=1e-7)
  # AdamW adds lr * weight_decay * w, decoupled from the gradient's scaling.
  (adamw,) = _updates({'optimizer': 'adamw', 'learning_rate': 0.01, 'weight_decay': 0.1},
                      [g], params)
  np.testing.assert_allclose(adamw, adam_step - 0.01 * 0.1 * params, rtol=1e-5, atol=1e-7)
  (no_decay,) = _updates({'optimizer': 'adamw', 'learning_rate': 0.01, 'weight_decay': 0.0},
                         [g], params)
  np.testing.assert_allclose(no_decay, adam, rtol=1e-6)


def test_unknown_optimizer_names_the_field():
  with pytest.raises(ValueError, match="config.train.optimizer: unknown optimizer 'rmsprop'"):
    train.make_optimizer(config_sections.section('train', optimizer='rmsprop',
                                                 learning_rate=0.1))


def test_select_best_keeps_each_seeds_own_best_epoch():
  """Vmapped over seeds, as `make_programs` runs it: each seed keeps the parameters of its
  own best epoch (the first on ties), whatever the other seed's scores."""
  tx = optax.sgd(0.1)
  state = jax.vmap(lambda k: train.create_train_state(k, model=_Linear(), tx=tx,
                                                      image_shape=(2, 2, 3)))(
      jax.random.split(jax.random.PRNGKey(0), 2))
  select = jax.jit(jax.vmap(evaluation.select_best))
  scores = {1: [0.5, 0.9], 2: [0.7, 0.9], 3: [0.7, 0.6], 4: [0.6, 0.95]}
  for epoch, score in scores.items():
    # This epoch's parameters are marked with its number.
    state = state.replace(params=jax.tree.map(lambda a: a * 0 + epoch, state.params),
                          epoch=jnp.full((2,), epoch, jnp.int32))
    state = select(state, jnp.asarray(score, jnp.float32))
  np.testing.assert_array_equal(state.best_epoch, [2, 4])
  np.testing.assert_allclose(state.best_score, [0.7, 0.95])
  kernel = state.best_params['Dense_0']['kernel']
  np.testing.assert_array_equal(kernel[0], 2)
  np.testing.assert_array_equal(kernel[1], 4)


def test_selection_reads_the_validation_accuracy_and_never_the_test(test_config, tmp_path,
                                                                   monkeypatch):
  """In a training run, the score `select_best` receives each epoch is that epoch's
  validation accuracy (as metrics.jsonl records it), never a test measure."""
  config = test_config.copy_and_resolve_references()
  with config.unlocked():
    config.train.epochs = 4
    config.train.log_test_every_epoch = True  # test accuracy computed, so it could be misread
  examples = ip.load_examples(config.data)
  split = ip.make_splits(examples.labels, config.split)[0]
  # Where the score comes from is tested, not what learns: a linear model compiles fast. The
  # programs' cache is emptied so that no other test gets these programs under 'cnn'.
  monkeypatch.setattr(train.models, 'get_model', lambda name, *, num_classes, conv_impl: (
      _Linear(num_classes)))
  monkeypatch.setattr(train, '_PROGRAMS', {})
  scores = []
  make_programs = train.make_programs

  def recording_make_programs(*args, **kwargs):
    programs = make_programs(*args, **kwargs)

    def select_best(state, score):
      scores.append(np.asarray(score))
      return programs.select_best(state, score)

    return dataclasses.replace(programs, select_best=select_best)

  monkeypatch.setattr(train, 'make_programs', recording_make_programs)
  results = train.train_and_evaluate(config, str(tmp_path), examples=examples, split=split,
                                     model_name='cnn', augment=False, log=lambda s: None)
  history = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  val = np.array([row['val_acc'] for row in history])  # [epochs, seeds]
  test = np.array([row['test_acc'] for row in history])
  assert not np.allclose(val, test)  # a score read from the test split would show
  np.testing.assert_allclose(np.stack(scores), val, rtol=1e-6)
  np.testing.assert_array_equal(results['best_epoch'], np.argmax(val, axis=0) + 1)
