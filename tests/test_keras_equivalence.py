"""The Flax paper models compute what their Keras twins (wbc_jax.keras_twins) compute.

Each Flax model gets random parameters (non-zero biases, batch-norm statistics away from 0
and 1, so that a dropped or misplaced one shows), which are copied into its Keras twin; both
then run on the same random inputs, at the paper's 60x80 frame size (non-square, so that a
transposed flatten or reshape shows). Inference mode is compared to 1e-5, and so are the
gradients of one training step's loss with respect to every weight: with dropout off for the
classifiers (inference mode: the random masks of the two frameworks cannot agree), in
training mode with batch statistics for the GAN's generator, and for its discriminator with
dropout rate 0, where the moving statistics each step writes are compared too.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# Read when Keras is first imported; the twins' gradients are taken with TensorFlow's tape.
os.environ['KERAS_BACKEND'] = 'tensorflow'
keras = pytest.importorskip(
    'keras', reason='Keras is not installed (it comes with tensorflow-cpu); the Keras '
    'equivalence of the paper models cannot be checked')
import tensorflow as tf  # noqa: E402

from wbc_jax import keras_twins  # noqa: E402
from wbc_jax import models  # noqa: E402
from wbc_jax.gan import models as gan_models  # noqa: E402

HEIGHT, WIDTH = 60, 80
BATCH = 3
NUM_CLASSES = 4
LATENT = 100
ATOL = RTOL = 1e-5


def _random_variables(module, *args, seed: int):
  """Variables of `module` with generic values, drawn by numpy (no init to compile).

  Kernels are scaled by 1 / sqrt(fan_in), so activations stay of order one through the 8 M
  parameters and a 1e-5 tolerance means the same at every layer.
  """
  abstract = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), *args)
  rng = np.random.default_rng(seed)
  normal = lambda shape, scale: (scale * rng.standard_normal(shape)).astype(np.float32)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return normal(leaf.shape, 1 / np.sqrt(np.prod(leaf.shape[:-1])))
    if name == 'scale':
      return 1 + normal(leaf.shape, 0.1)
    if name == 'var':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return normal(leaf.shape, 0.1)  # bias, batch-norm shift and mean

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _images(seed: int, low: float = 0.0):
  rng = np.random.default_rng(seed)
  return rng.uniform(low, 1.0, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)


def _assert_weights_close(got: list, want: keras_twins.WeightsByLayer, what: str, scale=True):
  """Keras arrays, flattened in `want`'s layer order, against the Flax ones mapped to Keras's
  layout. With `scale`, the tolerance is relative to each array's largest entry: gradients
  of different layers differ in size by orders of magnitude."""
  names = [f'{layer}[{i}]' for layer, values in want.items() for i in range(len(values))]
  flat = [w for values in want.values() for w in values]
  assert len(got) == len(flat), (what, len(got), len(flat))
  for name, g, w in zip(names, got, flat, strict=True):
    g = np.asarray(g)
    assert g.shape == w.shape, (what, name, g.shape, w.shape)
    atol = ATOL * max(1.0, float(np.abs(w).max())) if scale else ATOL
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol, err_msg=f'{what}: {name}')


# --------------------------------------------------------------------------------------------
# The classifiers
# --------------------------------------------------------------------------------------------


@functools.cache
def _classifier_pair(name: str):
  """(flax module, its params, the Keras twin holding the same weights)."""
  module = models.get_model(name, num_classes=NUM_CLASSES)
  params = _random_variables(module, jnp.zeros((1, HEIGHT, WIDTH, 3)), seed=len(name))['params']
  twin = keras_twins.classifier(name, (HEIGHT, WIDTH, 3), NUM_CLASSES)
  keras_twins.set_weights(twin, keras_twins.classifier_weights(name, params))
  return module, params, twin


@pytest.mark.parametrize('name', keras_twins.CLASSIFIERS)
def test_classifier_twin_has_the_same_parameters(name):
  module, params, twin = _classifier_pair(name)
  assert twin.count_params() == models.count_params(params)
  # The pinned counts of the paper models (tests/test_models.py) are Keras's own count.
  assert twin.count_params() == {'cnn': 8_240_772, 'cnn_rnn': 8_925_764}[name]


@pytest.mark.parametrize('name', keras_twins.CLASSIFIERS)
def test_classifier_logits_match_keras(name):
  module, params, twin = _classifier_pair(name)
  x = _images(seed=1)
  got = jax.jit(functools.partial(module.apply, train=False))({'params': params}, x)
  want = twin(x, training=False).numpy()
  assert np.abs(want).max() > 0.1  # logits of a working network, not all near zero
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('name', keras_twins.CLASSIFIERS)
def test_classifier_loss_gradients_match_keras(name):
  """The gradient of the paper's loss (mean cross-entropy of the logits, as the train step
  and Keras's SparseCategoricalCrossentropy(from_logits=True) compute it), dropout off."""
  module, params, twin = _classifier_pair(name)
  x = _images(seed=2)
  labels = np.array([0, 3, 1], np.int32)

  def loss_fn(params):
    logits = module.apply({'params': params}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  want = keras_twins.classifier_weights(name, grads)
  variables = keras_twins.trainable_by_layer(twin, want)
  assert len(variables) == len(twin.trainable_weights)  # every weight is compared
  loss_fn_keras = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  with tf.GradientTape() as tape:
    keras_loss = loss_fn_keras(labels, twin(x, training=False))
  np.testing.assert_allclose(loss, keras_loss.numpy(), rtol=RTOL, atol=ATOL)
  _assert_weights_close(tape.gradient(keras_loss, variables), want, f'{name} gradients')


# --------------------------------------------------------------------------------------------
# The paper's DCGAN
# --------------------------------------------------------------------------------------------


@functools.cache
def _generator_pair():
  module = gan_models.PaperGenerator(HEIGHT, WIDTH, LATENT)
  variables = _random_variables(module, jnp.zeros((1, LATENT)), seed=10)
  return module, variables


@functools.cache
def _discriminator_pair(dropout_rate: float):
  module = gan_models.PaperDiscriminator(dropout_rate=dropout_rate)
  variables = _random_variables(module, jnp.zeros((1, HEIGHT, WIDTH, 3)), seed=11)
  return module, variables


def _generator_twin(variables):
  twin = keras_twins.paper_generator(HEIGHT, WIDTH, LATENT)
  keras_twins.set_weights(twin, keras_twins.generator_weights(variables['params'],
                                                              variables['batch_stats']))
  return twin


def _discriminator_twin(variables, dropout_rate: float):
  twin = keras_twins.paper_discriminator(HEIGHT, WIDTH, dropout_rate=dropout_rate)
  keras_twins.set_weights(twin, keras_twins.discriminator_weights(variables['params'],
                                                                  variables['batch_stats']))
  return twin


def _latents(seed: int):
  return np.random.default_rng(seed).standard_normal((BATCH, LATENT)).astype(np.float32)


def test_gan_twins_have_the_same_parameters():
  _, g_vars = _generator_pair()
  _, d_vars = _discriminator_pair(0.25)
  g_twin, d_twin = _generator_twin(g_vars), _discriminator_twin(d_vars, 0.25)
  assert keras_twins.trainable_params(g_twin) == models.count_params(g_vars['params'])
  assert keras_twins.trainable_params(d_twin) == models.count_params(d_vars['params'])
  # Moving statistics: Keras's non-trainable weights, flax's batch_stats.
  assert (g_twin.count_params() - keras_twins.trainable_params(g_twin)
          == models.count_params(g_vars['batch_stats']))


def test_generator_matches_keras_in_inference():
  module, variables = _generator_pair()
  z = _latents(seed=3)
  got = jax.jit(functools.partial(module.apply, train=False))(variables, z)
  want = _generator_twin(variables)(z, training=False).numpy()
  assert np.abs(want).std() > 0.1  # tanh images, not saturated nor flat
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_generator_training_step_matches_keras():
  """Batch statistics in the forward pass, the gradient of a loss on the images, and the
  moving statistics the step leaves (momentum 0.8, epsilon 1e-3, as the study's Keras)."""
  module, variables = _generator_pair()
  z = _latents(seed=4)
  cotangent = np.random.default_rng(5).standard_normal((BATCH, HEIGHT, WIDTH, 3)).astype(
      np.float32)

  def loss_fn(params):
    images, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                   z, train=True, mutable=['batch_stats'])
    return jnp.mean(images * cotangent), (images, updates['batch_stats'])

  (_, (images, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables['params'])
  twin = _generator_twin(variables)
  want = keras_twins.generator_weights(grads)
  trainable = keras_twins.trainable_by_layer(twin, want)
  with tf.GradientTape() as tape:
    keras_images = twin(z, training=True)
    keras_loss = tf.reduce_mean(keras_images * cotangent)
  np.testing.assert_allclose(images, keras_images.numpy(), rtol=RTOL, atol=ATOL)
  _assert_weights_close(tape.gradient(keras_loss, trainable), want, 'generator gradients')
  moving = {f'bn_{i}': [np.asarray(stats[f'BatchNorm_{i}'][k]) for k in ('mean', 'var')]
            for i in range(2)}
  _assert_weights_close([w for n in moving for w in twin.get_layer(n).non_trainable_weights],
                        moving, 'generator moving statistics', scale=False)


def test_discriminator_matches_keras_in_inference():
  module, variables = _discriminator_pair(0.25)
  x = _images(seed=6, low=-1.0)
  got = jax.jit(functools.partial(module.apply, train=False))(variables, x)
  want = _discriminator_twin(variables, 0.25)(x, training=False).numpy()
  assert want.shape == (BATCH, 1) and np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want[:, 0], rtol=RTOL, atol=ATOL)


def test_discriminator_training_step_matches_keras():
  """Training mode (batch statistics) with dropout rate 0, the only rate at which the two
  frameworks' dropout agree: the BCE loss on a real batch, its gradients and the moving
  statistics."""
  module, variables = _discriminator_pair(0.0)
  x = _images(seed=7, low=-1.0)

  def loss_fn(params):
    logits, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                   x, train=True, mutable=['batch_stats'])
    return optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits)).mean(), (
        logits, updates['batch_stats'])

  (loss, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables['params'])
  twin = _discriminator_twin(variables, 0.0)
  want = keras_twins.discriminator_weights(grads)
  trainable = keras_twins.trainable_by_layer(twin, want)
  bce = keras.losses.BinaryCrossentropy(from_logits=True)
  with tf.GradientTape() as tape:
    keras_logits = twin(x, training=True)
    keras_loss = bce(tf.ones_like(keras_logits), keras_logits)
  np.testing.assert_allclose(logits, keras_logits.numpy()[:, 0], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(loss, keras_loss.numpy(), rtol=RTOL, atol=ATOL)
  _assert_weights_close(tape.gradient(keras_loss, trainable), want, 'discriminator gradients')
  moving = {f'bn_{i}': [np.asarray(stats[f'BatchNorm_{i}'][k]) for k in ('mean', 'var')]
            for i in range(3)}
  _assert_weights_close([w for n in moving for w in twin.get_layer(n).non_trainable_weights],
                        moving, 'discriminator moving statistics', scale=False)


def test_twin_copy_refuses_missing_layers():
  _, params, twin = _classifier_pair('cnn')
  weights = keras_twins.classifier_weights('cnn', params)
  del weights['conv_1']
  with pytest.raises(ValueError, match="conv_1"):
    keras_twins.set_weights(twin, weights)
