"""Tests for wbc_jax.models: sizes, shapes, conv equivalence, dropout, RNN semantics, vmap."""

import functools
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wbc_jax import models, onednn_conv

PAPER_SHAPE = (60, 80, 3)
# The convolution implementations to compare; oneDNN's where its library is built.
CONV_IMPLS = ('xla', 'matmul') + (('onednn',) if onednn_conv.available() else ())


def _abstract_variables(model, shape, batch=1):
  """Variables as ShapeDtypeStructs: shapes without allocating or computing anything."""
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _key(seed):
  """A PRNG key of the 'rbg' kind.

  XLA's CPU compiler spends seconds, for some sets of shapes minutes, on a jitted init whose
  threefry draws have many different shapes; with 'rbg' keys it takes about a second. The
  tests need generic random values, not the default stream.
  """
  return jax.random.key(seed, impl='rbg')


def _normal(shape, seed=0):
  """Test data from numpy, which has nothing to compile."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _images(shape, batch=2, seed=0):
  """[batch, *shape] uniform in [0, 1], like the input pipeline's images."""
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, *shape)), jnp.float32)


# --------------------------------------------------------------------------------------------
# Sizes and shapes
# --------------------------------------------------------------------------------------------


def _resnet_params(widths, blocks_per_stage, num_classes=4):
  """`models.ResNet`'s parameter count from its layer shapes: 3x3 convolutions without bias,
  each followed by a batch norm (scale and shift), 1x1 projections where the width changes."""
  conv_bn = lambda cin, cout: 9 * cin * cout + 2 * cout
  total = conv_bn(3, widths[0])  # the stem
  cin = widths[0]
  for width in widths:
    for _ in range(blocks_per_stage):
      total += conv_bn(cin, width) + conv_bn(width, width)
      if cin != width:
        total += cin * width + 2 * width  # the projection and its batch norm
      cin = width
  return total + widths[-1] * num_classes + num_classes  # the dense head


@pytest.mark.parametrize(
    'name, shape, expected',
    [
        # The paper models' counts are Keras's own (tests/test_keras_equivalence.py builds the
        # Keras twins): 27*37*64 = 63,936 and 28*38*64 + 2*64 = 68,224 features into Dense 128.
        ('cnn', PAPER_SHAPE, 8_240_772),
        ('cnn_rnn', PAPER_SHAPE, 8_925_764),  # Keras: 8,926,788 with cuDNN's second LSTM bias
        ('resnet', (64, 64, 3), _resnet_params((32, 64, 128), 2)),
        ('resnet', (96, 96, 3), _resnet_params((32, 64, 128), 2)),  # global pooling
        ('cellnet', (64, 64, 3), _resnet_params((16, 32, 64, 128), 1)),
    ],
)
def test_param_count_is_pinned(name, shape, expected):
  variables = _abstract_variables(models.get_model(name, num_classes=4), shape)
  assert models.count_params(variables['params']) == expected


def test_resnet_counts_by_hand():
  # The formula above, summed by hand for the default ResNet: stem 864 + 64; stage 1, two
  # blocks of 2 * (9,216 + 64); stage 2, 18,432 + 128 + 36,864 + 128 + projection 2,048 + 128,
  # then 2 * (36,864 + 128); stage 3 likewise at 64 -> 128; head 128 * 4 + 4.
  assert _resnet_params((32, 64, 128), 2) == 695_844
  assert _resnet_params((16, 32, 64, 128), 1) == 308_052  # CellNet's docstring


def test_cnn_rnn_param_tree_names_the_lstm_layers():
  variables = _abstract_variables(models.CNNRNN(), PAPER_SHAPE)
  encoder = variables['params']['BiLSTMEncoder_0']
  assert set(encoder) == {'bilstm_1', 'bilstm_2'}
  assert set(encoder['bilstm_2']) == {'forward_rnn', 'backward_rnn'}
  assert encoder['bilstm_1']['forward_rnn']['cell']['ii']['kernel'].shape == (80, 64)
  assert encoder['bilstm_2']['backward_rnn']['cell']['ii']['kernel'].shape == (128, 64)


@pytest.mark.parametrize(
    'name, shape',
    [
        ('cnn', PAPER_SHAPE),
        ('cnn_rnn', PAPER_SHAPE),
        ('resnet', (64, 64, 3)),
        ('resnet', (96, 96, 3)),
    ],
)
def test_output_shape(name, shape):
  model = models.get_model(name, num_classes=5)
  x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)

  def forward(x):
    variables = model.init(jax.random.key(0), x, train=False)
    logits, _ = model.apply(
        variables,
        x,
        train=True,
        rngs={'dropout': jax.random.key(1)},
        mutable=['batch_stats'],
    )
    return logits

  logits = jax.eval_shape(forward, x)
  assert logits.shape == (3, 5)
  assert logits.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Conv3x3
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('size', [(7, 9), (8, 10)])
def test_conv3x3_implementations_match_flax_conv(padding, strides, size):
  x = _normal((2, *size, 3))
  reference = nn.Conv(5, (3, 3), strides=strides, padding=padding)
  params = jax.jit(reference.init)(_key(1), x)['params']
  # A non-zero bias, so that a dropped or misplaced bias would show.
  params = {**params, 'bias': _normal((5,), seed=2)}
  out_shape = jax.eval_shape(lambda x: reference.apply({'params': params}, x), x).shape
  cotangent = _normal(out_shape, seed=3)

  def value_and_grads(module):
    def loss(params, x):
      y = module.apply({'params': params}, x)
      return jnp.sum(y * cotangent), y

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y), (g_params, g_x) = grad_fn(params, x)
    return y, g_params['kernel'], g_params['bias'], g_x

  expected = value_and_grads(reference)
  for impl in CONV_IMPLS:
    conv = models.Conv3x3(5, strides=strides, padding=padding, conv_impl=impl)
    abstract = jax.eval_shape(conv.init, _key(1), x)['params']
    assert jax.tree_util.tree_map(jnp.shape, abstract) == (
        jax.tree_util.tree_map(jnp.shape, params)
    )
    for got, want, what in zip(
        value_and_grads(conv), expected, ('output', 'd kernel', 'd bias', 'd input')
    ):
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f'{impl}: {what}')


@pytest.mark.parametrize('shape', [(2, 54, 74, 5), (2, 55, 75, 3)])
def test_max_pool_matches_flax_max_pool_values_and_gradients(shape):
  # Distinct random values: no tied maxima, where the two gradients may differ by design.
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  np.testing.assert_array_equal(models._max_pool_2x2(x), flax_pool(x))
  loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(x)))
  np.testing.assert_allclose(jax.grad(loss(models._max_pool_2x2))(x),
                             jax.grad(loss(flax_pool))(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_gan_convolutions_do_not_depend_on_conv_impl():
  from wbc_jax.gan import models as gan_models
  labels = jnp.array([0, 1, 3])
  for g, d in [(gan_models.PaperGenerator(16, 20), gan_models.PaperDiscriminator()),
               (gan_models.CondGenerator(16, 20, 4, channels=8),
                gan_models.CondDiscriminator(4, channels=8))]:
    z = jax.random.normal(jax.random.PRNGKey(0), (3, g.latent_dim))
    g_vars = g.init(jax.random.PRNGKey(1), z, labels, train=False)
    images = [g.clone(conv_impl=i).apply(g_vars, z, labels, train=False) for i in CONV_IMPLS]
    for image in images[1:]:
      np.testing.assert_allclose(images[0], image, rtol=1e-5, atol=1e-5)
    d_vars = d.init(jax.random.PRNGKey(2), images[0], labels, train=False)
    logits = [d.clone(conv_impl=i).apply(d_vars, images[0], labels, train=False)
              for i in CONV_IMPLS]
    for logit in logits[1:]:
      np.testing.assert_allclose(logits[0], logit, rtol=1e-4, atol=1e-4)
    # Named as the nn.Conv layers were, so GAN checkpoints keep loading.
    convs = g_vars['params'] if 'Conv_1' in g_vars['params'] else g_vars['params']['GBlock_0']
    assert convs['Conv_0']['kernel'].shape[:2] == (3, 3) and 'bias' in convs['Conv_1']


def test_conv3x3_rejects_unknown_impl_and_padding():
  x = jnp.zeros((1, 5, 5, 2))
  with pytest.raises(ValueError, match="'cudnn'.*xla, matmul, onednn, auto"):
    models.Conv3x3(4, conv_impl='cudnn').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="'FULL'"):
    models.Conv3x3(4, padding='FULL').init(jax.random.key(0), x)


def test_cnn_logits_do_not_depend_on_conv_impl():
  _, x, variables, _ = _small_model('cnn')
  by_impl = [
      jax.jit(partial(models.CNN(conv_impl=impl).apply, train=False))(variables, x)
      for impl in CONV_IMPLS
  ]
  for logits in by_impl[1:]:
    np.testing.assert_allclose(by_impl[0], logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Dropout, batch norm, vmap over seeds
# --------------------------------------------------------------------------------------------


def _generic_variables(model, x):
  """Variables with generic values, drawn by numpy so that no init has to compile.

  The real init is exercised, jitted and vmapped, by the vmap test. Batch-norm statistics
  start as in a real init: mean 0, variance 1.
  """
  abstract = jax.eval_shape(partial(model.init, train=False), _key(0), x)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  def fill(seed, path, leaf):
    name = path[-1].key
    if name in ('mean', 'var'):
      return jnp.full(leaf.shape, float(name == 'var'), jnp.float32)
    return 0.1 * _normal(leaf.shape, seed=seed)

  return treedef.unflatten([fill(i, path, leaf) for i, (path, leaf) in enumerate(leaves)])


@functools.cache
def _small_model(name):
  """A small instance of each model, its images, variables and a jitted apply (cached).

  Same code paths as the full models; fewer blocks and units keep compiles short.

  Returns:
    (model, images [2, h, w, 3], variables, apply) with
    apply(variables, x, rng, *, train) -> (logits [2, 4], batch_stats updates).
  """
  model, shape = {
      'cnn': (models.CNN(), (12, 16, 3)),
      'cnn_rnn': (models.CNNRNN(lstm_units=8), (12, 16, 3)),
      'resnet': (models.ResNet(widths=(8, 16), blocks_per_stage=1), (16, 16, 3)),
      'cellnet': (models.CellNet(widths=(8, 16)), (16, 16, 3)),
  }[name]
  x = _images(shape)
  variables = _generic_variables(model, x)

  @partial(jax.jit, static_argnames='train')
  def apply(variables, x, rng, *, train):
    return model.apply(
        variables, x, train=train, rngs={'dropout': rng}, mutable=['batch_stats']
    )

  return model, x, variables, apply


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_dropout_only_in_training(name):
  _, x, variables, apply = _small_model(name)
  logits = lambda train, seed: apply(variables, x, _key(seed), train=train)[0]

  np.testing.assert_array_equal(logits(False, 1), logits(False, 2))
  np.testing.assert_array_equal(logits(True, 1), logits(True, 1))
  assert not np.allclose(logits(True, 1), logits(True, 2))


def test_resnet_batch_norm_uses_batch_stats_only_in_training():
  _, x, variables, apply = _small_model('resnet')
  rng = _key(1)

  _, updates = apply(variables, x, rng, train=True)
  changed = jax.tree_util.tree_map(
      lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'], updates['batch_stats']
  )
  assert all(jax.tree_util.tree_leaves(changed))

  # Evaluation normalises with the running averages (here the initial 0 and 1), not with
  # the batch's statistics, and leaves them alone.
  _, updates = apply(variables, x, rng, train=False)
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats']
  )
  shifted = jax.tree_util.tree_map(lambda a: a + 1.0, variables['batch_stats'])
  assert not np.allclose(
      apply(variables, x, rng, train=False)[0],
      apply({**variables, 'batch_stats': shifted}, x, rng, train=False)[0],
  )


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_vmap_over_seeds_matches_each_seed_alone(name):
  model, x, _, apply = _small_model(name)
  rng = _key(0)
  keys = jax.random.split(_key(1), 2)
  stacked = jax.jit(jax.vmap(lambda k: model.init(k, x, train=False)))(keys)

  logits = jax.jit(jax.vmap(lambda v: apply(v, x, rng, train=False)[0]))(stacked)

  assert logits.shape == (2, 2, 4)
  for seed in range(2):
    alone = jax.tree_util.tree_map(lambda a: a[seed], stacked)
    np.testing.assert_allclose(
        logits[seed], apply(alone, x, rng, train=False)[0], atol=1e-5, rtol=1e-5
    )
  assert not np.allclose(logits[0], logits[1])  # the seeds really got different params


# --------------------------------------------------------------------------------------------
# The CNN-RNN's recurrent branch
# --------------------------------------------------------------------------------------------


@functools.cache
def _lstm_step(units):
  return jax.jit(nn.LSTMCell(units).apply)


def _run_lstm(cell_params, xs, units):
  """Reference LSTM: the flax cell stepped in a Python loop. [b, t, f] -> [b, t, units]."""
  step = _lstm_step(units)
  carry = (jnp.zeros((xs.shape[0], units)), jnp.zeros((xs.shape[0], units)))
  outputs = []
  for t in range(xs.shape[1]):
    carry, h = step({'params': cell_params}, carry, xs[:, t])
    outputs.append(h)
  return jnp.stack(outputs, axis=1)


def test_bilstm_encoder_matches_keras_semantics():
  units = 4
  x = _normal((2, 6, 3))
  encoder = models.BiLSTMEncoder(units)
  # Any params will do, and numpy draws them without compiling an init.
  abstract = jax.eval_shape(encoder.init, _key(1), x)['params']
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  params = treedef.unflatten([0.5 * _normal(a.shape, seed=i) for i, a in enumerate(leaves)])
  cell = lambda layer, direction: params[layer][f'{direction}_rnn']['cell']

  # Layer 1 returns sequences, with the backward outputs put back in time order.
  forward = _run_lstm(cell('bilstm_1', 'forward'), x, units)
  backward = _run_lstm(cell('bilstm_1', 'backward'), x[:, ::-1], units)[:, ::-1]
  sequence = jnp.concatenate([forward, backward], axis=-1)
  # Layer 2 returns, per direction, the output after reading the whole sequence: for the
  # backward LSTM that is its output at time step 0, not at the last one.
  forward_final = _run_lstm(cell('bilstm_2', 'forward'), sequence, units)[:, -1]
  backward_final = _run_lstm(cell('bilstm_2', 'backward'), sequence[:, ::-1], units)[:, -1]
  expected = jnp.concatenate([forward_final, backward_final], axis=-1)

  got = jax.jit(encoder.apply)({'params': params}, x)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_lstm_init_is_keras_like():
  cell = models._lstm_cell(64)
  x = jnp.zeros((1, 80))  # one time step of the 60x80 image's rows
  carry = cell.initialize_carry(_key(0), x.shape)
  cell = jax.jit(cell.init)(_key(0), carry, x)['params']
  # Input kernels: glorot_uniform over Keras's fused [80, 4 * 64] kernel.
  limit = np.sqrt(6.0 / (80 + 4 * 64))
  assert np.abs(cell['ii']['kernel']).max() <= limit
  assert np.abs(cell['ii']['kernel']).max() > 0.9 * limit
  # Recurrent kernels: orthogonal.
  w = np.asarray(cell['hi']['kernel'])
  np.testing.assert_allclose(w.T @ w, np.eye(64), atol=1e-5)
  # Biases: 1 for the forget gate (Keras's unit_forget_bias), 0 for the others; the input
  # kernels carry none of their own.
  np.testing.assert_array_equal(cell['hf']['bias'], np.ones(64))
  for gate in ('hi', 'hg', 'ho'):
    np.testing.assert_array_equal(cell[gate]['bias'], np.zeros(64))
  assert set(cell['if']) == {'kernel'}


@pytest.mark.parametrize('shape', [(6, 6), (7, 3), (3, 7)])
def test_orthogonal_init_has_orthonormal_columns_or_rows(shape):
  keys = jax.random.split(_key(0), 3)
  # Seed-vmapped and jitted, as a multi-seed init runs it.
  w = np.asarray(jax.jit(jax.vmap(lambda k: models._orthogonal_init(k, shape)))(keys))
  assert w.shape == (3, *shape)
  small = min(shape)
  gram = w.transpose(0, 2, 1) @ w if shape[0] >= shape[1] else w @ w.transpose(0, 2, 1)
  np.testing.assert_allclose(gram, np.broadcast_to(np.eye(small), gram.shape), atol=1e-5)
  assert not np.allclose(w[0], w[1])


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_get_model_builds_each_model_with_its_options():
  assert models.MODEL_NAMES == ('cnn', 'cnn_rnn', 'resnet', 'cellnet')
  model = models.get_model('cnn_rnn', num_classes=3, conv_impl='xla', lstm_units=8)
  assert isinstance(model, models.CNNRNN)
  assert (model.num_classes, model.conv_impl, model.lstm_units) == (3, 'xla', 8)
  assert isinstance(models.get_model('cnn', num_classes=4), models.CNN)
  assert models.get_model('resnet', num_classes=4, widths=(8, 16)).widths == (8, 16)


def test_get_model_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown model 'vgg'; expected one of cnn, cnn_rnn, resnet"):
    models.get_model('vgg', num_classes=4)
  with pytest.raises(ValueError, match="'fft'"):
    models.get_model('cnn', num_classes=4, conv_impl='fft')
