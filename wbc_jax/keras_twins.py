"""The published study's Keras models, rebuilt in Keras 3 as twins of wbc_jax's Flax modules.

Two users: tests/test_keras_equivalence.py copies a Flax model's parameters into its twin and
checks that both compute the same function (outputs and gradients), which is what makes the
Flax module a reproduction of the Keras original; scripts/benchmark.py times the twins as its
peer. One definition serves both, so the benchmark times the model the tests have checked.

  twin                        Flax module
  classifier('cnn')           wbc_jax.models.CNN
  classifier('cnn_rnn')       wbc_jax.models.CNNRNN
  paper_generator             wbc_jax.gan.models.PaperGenerator
  paper_discriminator         wbc_jax.gan.models.PaperDiscriminator
  paper_gan                   one step of both, as wbc_jax.gan.train.gan_train_step runs it

Keras is imported inside the functions: it arrives with TensorFlow but wbc_jax's training
never needs it, and importing this module must not start it. The `*_weights` functions are
plain numpy and need no Keras.

Parameter layouts, Flax -> Keras (`classifier_weights`, `generator_weights`, ...):
  Conv kernels [3, 3, cin, cout] (HWIO) and Dense kernels [in, out]: the same arrays.
  Flatten: both row-major over NHWC, so the first Dense kernel needs no permutation.
  LSTM: flax's cell has one Dense per gate, input kernels 'ii', 'if', 'ig', 'io' [in, units]
    without bias and recurrent kernels 'hi', 'hf', 'hg', 'ho' [units, units] with one;
    Keras fuses them into kernel [in, 4 units], recurrent_kernel [units, 4 units] and bias
    [4 units], gates in the order i, f, c, o (Keras's c is flax's g). Keras 3's LSTM keeps one
    bias per gate, as flax does (the paper's cuDNN LSTM kept two, summed).
  BatchNorm: params (scale, bias) and batch_stats (mean, var) -> (gamma, beta, moving_mean,
    moving_variance); both frameworks update a moving statistic as
    momentum * old + (1 - momentum) * batch, with the biased batch variance.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

PyTree = Any
WeightsByLayer = dict[str, list[np.ndarray]]

CLASSIFIERS = ('cnn', 'cnn_rnn')
# Keras's gate order in its fused LSTM kernels, as flax names the gates.
LSTM_GATES = ('i', 'f', 'g', 'o')


# --------------------------------------------------------------------------------------------
# Classifiers
# --------------------------------------------------------------------------------------------


def classifier(name: str, image_shape, num_classes: int = 4, lstm_units: int = 64):
  """The paper's CNN or CNN-RNN in Keras 3 (uncompiled), layer for layer as in wbc_jax.models.

  Layers with weights are named 'conv_0', ..., 'bilstm_1', 'bilstm_2', 'dense_0', 'dense_1',
  the names `classifier_weights` fills.
  """
  import keras
  from keras import layers

  if name not in CLASSIFIERS:
    raise ValueError(f'no Keras twin for {name!r}; expected one of {", ".join(CLASSIFIERS)}')
  inputs = keras.Input(image_shape)
  x = inputs
  for i, filters in enumerate((32, 64, 64) if name == 'cnn' else (32, 64)):
    x = layers.Conv2D(filters, 3, activation='relu', name=f'conv_{i}')(x)
  x = layers.MaxPooling2D(2)(x)
  x = layers.Dropout(0.25)(x)
  features = layers.Flatten()(x)
  if name == 'cnn_rnn':
    r = keras.ops.mean(inputs, axis=-1)  # rows are the time steps
    r = layers.Bidirectional(layers.LSTM(lstm_units, return_sequences=True), name='bilstm_1')(r)
    r = layers.Bidirectional(layers.LSTM(lstm_units), name='bilstm_2')(r)
    r = layers.Dropout(0.25)(r)
    features = layers.Concatenate()([features, r])
  x = layers.Dense(128, activation='relu', name='dense_0')(features)
  x = layers.Dropout(0.5)(x)
  outputs = layers.Dense(num_classes, name='dense_1')(x)
  return keras.Model(inputs, outputs, name=f'keras_{name}')


def compile_classifier(model) -> None:
  """Compiles a `classifier` as the paper trained it: Adam, cross-entropy on the logits.

  compile()'s defaults otherwise: jit_compile='auto', which Keras resolves to False for
  TensorFlow on a CPU-only machine, i.e. what model.fit runs for the paper's users.

  Keras's Adam epsilon is Kingma and Ba's "epsilon hat": it is added to sqrt(v) before the
  bias correction, where optax.adam (train.make_optimizer's 'adam', eps=1e-7) adds it after.
  The two steps agree to ~0.1% for gradients above ~1e-4 and differ for gradients near or
  below epsilon / sqrt(1 - beta_2 ** t) (~3e-6 at the first step), which Keras moves less.
  """
  import keras

  model.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=['accuracy'])


def _lstm_weights(cell: Mapping[str, Any]) -> list[np.ndarray]:
  """flax LSTMCell params -> Keras LSTM [kernel, recurrent_kernel, bias]."""
  fuse = lambda prefix, leaf: np.concatenate(
      [np.asarray(cell[f'{prefix}{g}'][leaf]) for g in LSTM_GATES], axis=-1)
  return [fuse('i', 'kernel'), fuse('h', 'kernel'), fuse('h', 'bias')]


def _bilstm_weights(layer: Mapping[str, Any]) -> list[np.ndarray]:
  """flax nn.Bidirectional params -> Keras Bidirectional weights (forward, then backward)."""
  return (_lstm_weights(layer['forward_rnn']['cell'])
          + _lstm_weights(layer['backward_rnn']['cell']))


def _dense_weights(layer: Mapping[str, Any]) -> list[np.ndarray]:
  return [np.asarray(layer['kernel']), np.asarray(layer['bias'])]


def classifier_weights(name: str, params: PyTree) -> WeightsByLayer:
  """The params of `models.CNN` / `models.CNNRNN` as the weights of `classifier(name)`'s
  layers: {layer name: the list its `set_weights` takes}. Gradients map the same way."""
  weights = {}
  for i in range(3 if name == 'cnn' else 2):
    weights[f'conv_{i}'] = _dense_weights(params[f'Conv3x3_{i}'])
  if name == 'cnn_rnn':
    encoder = params['BiLSTMEncoder_0']
    weights['bilstm_1'] = _bilstm_weights(encoder['bilstm_1'])
    weights['bilstm_2'] = _bilstm_weights(encoder['bilstm_2'])
  head = params['ClassifierHead_0']
  weights['dense_0'] = _dense_weights(head['Dense_0'])
  weights['dense_1'] = _dense_weights(head['Dense_1'])
  return weights


def set_weights(model, weights: WeightsByLayer) -> None:
  """Sets each named layer of a Keras model; every layer with weights must be named."""
  missing = {layer.name for layer in _layers(model) if layer.weights} - set(weights)
  if missing:
    raise ValueError(f'no weights given for layers {sorted(missing)}')
  for layer_name, values in weights.items():
    _find_layer(model, layer_name).set_weights(values)


def trainable_by_layer(model, layer_names) -> list:
  """The trainable variables of the named layers, in `WeightsByLayer` order, flattened."""
  return [v for n in layer_names for v in _find_layer(model, n).trainable_weights]


def _layers(model):
  """Every layer of a model, nested models' layers included (not the nested models)."""
  for layer in model.layers:
    if hasattr(layer, 'layers') and not hasattr(layer, 'forward_layer'):
      yield from _layers(layer)
    else:
      yield layer


def _find_layer(model, name: str):
  for layer in _layers(model):
    if layer.name == name:
      return layer
  raise ValueError(f'{model.name} has no layer {name!r}')


# --------------------------------------------------------------------------------------------
# The paper's DCGAN
# --------------------------------------------------------------------------------------------


def paper_generator(height: int, width: int, latent_dim: int = 100, bn_momentum: float = 0.8,
                    bn_epsilon: float = 1e-3):
  """The study's DCGAN generator (`PaperGenerator`): z [b, latent] -> [b, h, w, 3] in [-1, 1].

  Upsampling is nearest-neighbour followed by a 'same' convolution, not a transposed
  convolution, in both. Named layers: 'dense', 'conv_0'..'conv_2', 'bn_0', 'bn_1'.
  """
  import keras
  from keras import layers

  h0, w0 = height // 4, width // 4
  bn = lambda i: layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon,
                                           name=f'bn_{i}')
  z = keras.Input((latent_dim,))
  x = layers.Dense(h0 * w0 * 128, name='dense')(z)
  x = layers.ReLU()(layers.Reshape((h0, w0, 128))(x))
  for i, filters in enumerate((256, 128)):
    x = layers.UpSampling2D()(x)
    x = layers.ReLU()(bn(i)(layers.Conv2D(filters, 3, padding='same', name=f'conv_{i}')(x)))
  x = layers.Conv2D(3, 3, padding='same', name='conv_2')(x)
  return keras.Model(z, layers.Activation('tanh')(x), name='keras_paper_generator')


def paper_discriminator(height: int, width: int, bn_momentum: float = 0.8,
                        bn_epsilon: float = 1e-3, dropout_rate: float = 0.25):
  """The study's DCGAN discriminator (`PaperDiscriminator`): [b, h, w, 3] -> logits [b, 1].

  Named layers: 'conv_0'..'conv_3', 'bn_0'..'bn_2', 'dense'.
  """
  import keras
  from keras import layers

  image = keras.Input((height, width, 3))
  conv = lambda i, filters, strides: layers.Conv2D(filters, 3, strides=strides, padding='same',
                                                   name=f'conv_{i}')
  bn = lambda i: layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon,
                                           name=f'bn_{i}')
  act = lambda: layers.LeakyReLU(negative_slope=0.2)
  drop = lambda: layers.Dropout(dropout_rate)
  x = drop()(act()(conv(0, 32, 2)(image)))
  x = conv(1, 64, 2)(x)
  x = layers.ZeroPadding2D(((0, 1), (0, 1)))(x)
  x = drop()(act()(bn(0)(x)))
  x = drop()(act()(bn(1)(conv(2, 128, 2)(x))))
  x = drop()(act()(bn(2)(conv(3, 256, 1)(x))))
  return keras.Model(image, layers.Dense(1, name='dense')(layers.Flatten()(x)),
                     name='keras_paper_discriminator')


def _bn_weights(params: Mapping[str, Any], stats: Mapping[str, Any] | None) -> list[np.ndarray]:
  weights = [np.asarray(params['scale']), np.asarray(params['bias'])]
  if stats is not None:
    weights += [np.asarray(stats['mean']), np.asarray(stats['var'])]
  return weights


def generator_weights(params: PyTree, batch_stats: PyTree | None = None) -> WeightsByLayer:
  """`PaperGenerator` variables as `paper_generator`'s weights. Without batch_stats, the
  batch-norm layers get only (gamma, beta): the layout of gradients."""
  stats = lambda i: None if batch_stats is None else batch_stats[f'BatchNorm_{i}']
  weights = {'dense': _dense_weights(params['Dense_0'])}
  weights.update({f'conv_{i}': _dense_weights(params[f'Conv_{i}']) for i in range(3)})
  weights.update({f'bn_{i}': _bn_weights(params[f'BatchNorm_{i}'], stats(i)) for i in range(2)})
  return weights


def discriminator_weights(params: PyTree, batch_stats: PyTree | None = None) -> WeightsByLayer:
  """`PaperDiscriminator` variables as `paper_discriminator`'s weights (see
  `generator_weights`)."""
  stats = lambda i: None if batch_stats is None else batch_stats[f'BatchNorm_{i}']
  weights = {f'conv_{i}': _dense_weights(params[f'Conv_{i}']) for i in range(4)}
  weights.update({f'bn_{i}': _bn_weights(params[f'BatchNorm_{i}'], stats(i)) for i in range(3)})
  weights['dense'] = _dense_weights(params['Dense_0'])
  return weights


def paper_gan(height: int, width: int, latent_dim: int, lr: float, b1: float, b2: float):
  """The study's DCGAN as a compiled Keras model whose `train_step` is one GAN step.

  One step is one Adam step of D on a real and a generated batch, then one of G, with BCE on
  logits, as `wbc_jax.gan.train.gan_train_step` does; it is a Keras `train_step`, so
  `train_on_batch` runs it the way `model.fit` would.
  """
  import keras
  import tensorflow as tf

  generator = paper_generator(height, width, latent_dim)
  discriminator = paper_discriminator(height, width)
  bce = keras.losses.BinaryCrossentropy(from_logits=True)

  class PaperGAN(keras.Model):

    def __init__(self):
      super().__init__()
      self.generator, self.discriminator = generator, discriminator
      self.seed_generator = keras.random.SeedGenerator(0)

    def compile(self):
      super().compile()
      self.g_optimizer = keras.optimizers.Adam(lr, beta_1=b1, beta_2=b2)
      self.d_optimizer = keras.optimizers.Adam(lr, beta_1=b1, beta_2=b2)

    def train_step(self, data):
      real = data[0] if isinstance(data, (tuple, list)) else data
      n = tf.shape(real)[0]
      z = keras.random.normal((n, latent_dim), seed=self.seed_generator)
      fake = tf.stop_gradient(self.generator(z, training=True))
      with tf.GradientTape() as tape:
        real_logits = self.discriminator(real, training=True)
        fake_logits = self.discriminator(fake, training=True)
        d_loss = (bce(tf.ones_like(real_logits), real_logits)
                  + bce(tf.zeros_like(fake_logits), fake_logits))
      d_vars = self.discriminator.trainable_weights
      self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_vars), d_vars))
      z = keras.random.normal((n, latent_dim), seed=self.seed_generator)
      with tf.GradientTape() as tape:
        logits = self.discriminator(self.generator(z, training=True), training=True)
        g_loss = bce(tf.ones_like(logits), logits)
      g_vars = self.generator.trainable_weights
      self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, g_vars), g_vars))
      return {'d_loss': d_loss, 'g_loss': g_loss}

  gan = PaperGAN()
  gan.compile()
  return gan


def trainable_params(model) -> int:
  """Number of trainable scalars of a Keras model (batch-norm moving statistics excluded)."""
  return int(sum(math.prod(w.shape) for w in model.trainable_weights))
