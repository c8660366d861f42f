"""Tests for wbc_jax.onednn_conv: oneDNN convolutions against lax.conv_general_dilated.

Forward, input gradient and kernel gradient, under jit, vmap (a seed axis, batched or not on
either operand, nested) and second-order grad; and Conv3x3 / a small ResNet with
conv_impl='onednn'. Skipped where the library is not built.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from wbc_jax import models, onednn_conv

pytestmark = pytest.mark.skipif(
    not onednn_conv.available(),
    reason=f'oneDNN convolution library not built: {onednn_conv.load_error()}')

RTOL = 1e-5


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _lax_conv(x, kernel, stride, padding):
  if not isinstance(padding, str):
    padding = [tuple(p) for p in padding]
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _assert_close(got, want, what):
  """Max error relative to the largest reference value: float32 sums of a few hundred terms
  differ in the last bits, which an elementwise relative check would magnify near zero."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
  assert err <= RTOL, f'{what}: relative error {err:.2e}'


def _value_and_grads(conv, x, kernel, cotangent):
  """(y, dL/dx, dL/dkernel) of L = sum(y * cotangent), jitted."""
  def loss(x, kernel):
    y = conv(x, kernel)
    return jnp.sum(y * cotangent), y
  (_, y), (dx, dk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
  return y, dx, dk


# (batch, height, width, cin, cout, kernel size, stride, padding): 3x3 and 1x1, stride 1 and 2,
# SAME and VALID and explicit pads, odd and even sizes, batch 1, a 3-channel input.
CASES = [
    (1, 5, 5, 3, 4, 3, 1, 'SAME'),
    (2, 9, 7, 3, 8, 3, 2, 'SAME'),
    (2, 8, 8, 5, 6, 3, 2, 'SAME'),
    (3, 7, 9, 4, 5, 1, 2, 'SAME'),
    (2, 6, 5, 4, 3, 1, 1, 'VALID'),
    (1, 11, 6, 2, 7, 3, 2, 'VALID'),
    (2, 10, 12, 16, 8, 3, 1, 'VALID'),
    (2, 7, 6, 3, 4, 3, 2, ((1, 0), (2, 1))),
]


@pytest.mark.parametrize('n, h, w, cin, cout, k, stride, padding', CASES)
def test_forward_and_gradients_match_lax(n, h, w, cin, cout, k, stride, padding):
  x, kernel = _normal((n, h, w, cin), 0), _normal((k, k, cin, cout), 1)
  want_y = _lax_conv(x, kernel, stride, padding)
  cotangent = _normal(want_y.shape, 2)
  want = _value_and_grads(partial(_lax_conv, stride=stride, padding=padding), x, kernel,
                          cotangent)
  got = _value_and_grads(partial(onednn_conv.conv2d, stride=stride, padding=padding), x,
                         kernel, cotangent)
  for g, wnt, what in zip(got, want, ('output', 'd input', 'd kernel')):
    _assert_close(g, wnt, what)


@pytest.mark.parametrize('blocked', [(False, False, False), (True, True, True)])
def test_activation_layouts_give_the_same_results(blocked):
  """NHWC or oneDNN's blocked layouts (with reorders) in each pass, vmapped over 2 seeds."""
  previous = onednn_conv.set_blocked_passes(*blocked)
  try:
    for n, h, w, cin, cout, k, stride, padding in (CASES[1], CASES[6]):
      x, kernel = _normal((2, n, h, w, cin), 0), _normal((2, k, k, cin, cout), 1)
      def value_and_grads(conv):
        fn = jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, stride, padding))),
                                argnums=(0, 1))
        return jax.jit(jax.vmap(fn))(x, kernel)
      (want_v, want_g), (got_v, got_g) = (value_and_grads(_lax_conv),
                                          value_and_grads(onednn_conv.conv2d))
      _assert_close(got_v, want_v, 'value')
      _assert_close(got_g[0], want_g[0], 'd input')
      _assert_close(got_g[1], want_g[1], 'd kernel')
  finally:
    onednn_conv.set_blocked_passes(*previous)


@pytest.mark.parametrize('in_axes', [(0, 0), (0, None), (None, 0)])
def test_vmap_over_a_seed_axis(in_axes):
  """[S, B, H, W, C] images and [S, 3, 3, Ci, Co] kernels, either of them shared."""
  seeds, stride, padding = 3, 2, 'SAME'
  x = _normal((seeds, 2, 9, 8, 3), 0)
  kernel = _normal((seeds, 3, 3, 3, 5), 1)
  x = x if in_axes[0] == 0 else x[0]
  kernel = kernel if in_axes[1] == 0 else kernel[0]

  def loss_and_grads(conv):
    def loss(x, kernel):
      y = conv(x, kernel, stride, padding)
      return jnp.sum(jnp.sin(y)), y
    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y), (dx, dk) = jax.jit(jax.vmap(fn, in_axes=in_axes))(x, kernel)
    return y, dx, dk

  want = loss_and_grads(_lax_conv)
  got = loss_and_grads(onednn_conv.conv2d)
  for g, wnt, what in zip(got, want, ('output', 'd input', 'd kernel')):
    _assert_close(g, wnt, what)


def test_nested_vmap():
  x = _normal((2, 3, 1, 6, 5, 2), 0)  # [A, B, N, H, W, C]
  kernel = _normal((2, 1, 3, 3, 2, 4), 1)  # [A, 1, 3, 3, Ci, Co]: shared along B
  def conv(impl):
    inner = jax.vmap(lambda x, k: impl(x, k, 1, 'SAME'), in_axes=(0, None))
    return jax.jit(jax.vmap(inner))(x, kernel[:, 0])
  _assert_close(conv(onednn_conv.conv2d), conv(_lax_conv), 'output')


def test_second_order_gradient():
  """The R1 penalty's pattern: a gradient with respect to the input, differentiated again."""
  x, kernel = _normal((2, 6, 7, 3), 0), _normal((3, 3, 3, 4), 1)

  def penalty(conv):
    def r1(kernel, x):
      grad_x = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, kernel, 2, 'SAME'))))(x)
      return jnp.sum(grad_x ** 2)
    return jax.jit(jax.value_and_grad(r1, argnums=(0, 1)))(kernel, x)

  (want_v, want_g), (got_v, got_g) = penalty(_lax_conv), penalty(onednn_conv.conv2d)
  _assert_close(got_v, want_v, 'penalty')
  _assert_close(got_g[0], want_g[0], 'd kernel')
  _assert_close(got_g[1], want_g[1], 'd input')


def test_rejects_mismatched_channels():
  with pytest.raises(ValueError, match='kernel'):
    onednn_conv.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 4)))


def test_describe_cache_names_the_primitives():
  onednn_conv.conv2d(_normal((1, 6, 6, 4), 0), _normal((3, 3, 4, 4), 1))
  described = onednn_conv.describe_cache()
  assert 'fwd 1 6 6 4 6 6 4 3 3' in described
  # oneDNN's reference implementations are orders of magnitude slower than its JIT ones.
  assert 'ref' not in described.split('fwd 1 6 6 4 6 6 4 3 3')[1].splitlines()[0]


def test_auto_picks_onednn_on_cpu():
  if jax.default_backend() != 'cpu':
    pytest.skip('auto picks oneDNN on CPU only')
  assert models.resolve_conv_impl('auto') == 'onednn'


def test_resnet_with_onednn_matches_xla():
  """A small ResNet (stride-2 stem, 3x3 SAME convolutions of strides 1 and 2, batch norm)
  trained one gradient evaluation with each implementation, seeds vmapped."""
  model = models.ResNet(num_classes=4, widths=(4, 8), blocks_per_stage=1, stem_strides=2)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 3, 16, 16, 3)), jnp.float32)
  variables = jax.vmap(lambda k, x: model.init(k, x, train=False))(
      jax.random.split(jax.random.key(0, impl='rbg'), 2), x)

  def grads(impl):
    m = model.clone(conv_impl=impl)
    def loss(params, batch_stats, x):
      logits, _ = m.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                          mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
      return jnp.sum(logits ** 2)
    return jax.jit(jax.vmap(jax.grad(loss)))(variables['params'], variables['batch_stats'], x)

  want, got = grads('xla'), grads('onednn')
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    # Batch norm over 2x8x8 positions amplifies float32 rounding; 1e-4 of the largest value.
    np.testing.assert_allclose(g, w, atol=1e-4 * float(np.max(np.abs(w)) + 1e-6),
                               err_msg=jax.tree_util.keystr(path))
