r"""Two checks of the 3x3 convolution implementations (wbc_jax.models.Conv3x3) on this machine.

  python scripts/conv_impl_checks.py gan_drift   # conditional GAN losses, xla vs matmul
  python scripts/conv_impl_checks.py hybrid      # XLA forward + matmul gradient, timed

gan_drift: the `:quick` conditional GAN at 24x32 (batch 32, one fixed random batch), trained
12 steps from the same state with gan.conv_impl='xla' and 'matmul'; prints each step's
discriminator loss for both and their difference. The forward passes agree to 1e-5
(tests/test_models.py); this shows how training amplifies the rounding differences.

hybrid: the CNN's two convolutions (32 x 60x80x3 -> 32 -> 64, ReLU) forward and backward, with
XLA's convolution, the matmul path, and XLA's convolution forward with the matmul path's
gradient (a custom_vjp); medians of 7 alternating repetitions after a compile.
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import ablation  # noqa: E402
from wbc_jax import models  # noqa: E402
from wbc_jax.gan import train as gan_train  # noqa: E402


def gan_drift(steps: int = 12) -> None:
  config = ablation.get_config('quick').gan
  height, width = config.resolution_by_view.frame
  x = jax.random.uniform(jax.random.key(3), (config.batch_size, height, width, 3),
                         minval=-1, maxval=1)
  y = jax.random.randint(jax.random.key(4), (config.batch_size,), 0, 4)
  losses = {}
  for impl in ('xla', 'matmul'):
    c = config.copy_and_resolve_references()
    c.unlock()
    c.conv_impl = impl
    state = gan_train.init_gan_state(c, jax.random.PRNGKey(0), height, width, 4)
    step = jax.jit(partial(gan_train.gan_train_step, config=c,
                           num_classes=4))
    losses[impl] = []
    for _ in range(steps):
      state, metrics = step(state, x, y)
      losses[impl].append(float(metrics['d_loss']))
  print(f'conditional GAN at {height}x{width}, batch {config.batch_size}: d_loss by step')
  for i, (a, b) in enumerate(zip(losses['xla'], losses['matmul'])):
    print(f'  step {i + 1:2d}  xla {a:.6f}  matmul {b:.6f}  |diff| {abs(a - b):.2e}')


def _xla_conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _matmul_conv(x, k):
  return models._conv3x3_matmul(x, k, 1)


@jax.custom_vjp
def _hybrid_conv(x, k):
  return _xla_conv(x, k)


def _hybrid_fwd(x, k):
  return _xla_conv(x, k), (x, k)


def _hybrid_bwd(residuals, g):
  return jax.vjp(_matmul_conv, *residuals)[1](g)


_hybrid_conv.defvjp(_hybrid_fwd, _hybrid_bwd)


def hybrid(reps: int = 7) -> None:
  x = jax.random.normal(jax.random.key(0), (32, 60, 80, 3))
  k1 = jax.random.normal(jax.random.key(1), (3, 3, 3, 32)) * 0.2
  k2 = jax.random.normal(jax.random.key(2), (3, 3, 32, 64)) * 0.05

  def loss(conv, k1, k2):
    h = jax.nn.relu(conv(jax.nn.relu(conv(x, k1)), k2))
    return jnp.sum(jnp.sin(h))

  convs = {'xla': _xla_conv, 'matmul': _matmul_conv, 'hybrid': _hybrid_conv}
  grads = {n: jax.jit(jax.grad(partial(loss, c), argnums=(0, 1))) for n, c in convs.items()}
  reference = jax.block_until_ready(grads['xla'](k1, k2))
  for name, g in grads.items():  # compile, and check that all three compute the same
    for a, b in zip(jax.block_until_ready(g(k1, k2)), reference):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2 * float(jnp.abs(b).max()))
  times = {n: [] for n in grads}
  for _ in range(reps):
    for name, g in grads.items():
      start = time.perf_counter()
      jax.block_until_ready(g(k1, k2))
      times[name].append(time.perf_counter() - start)
  print(f'CNN convolutions forward + backward, batch 32, median of {reps} alternating reps:')
  for name, t in times.items():
    print(f'  {name:7s} {1e3 * np.median(t):7.0f} ms')


if __name__ == '__main__':
  checks = {'gan_drift': gan_drift, 'hybrid': hybrid}
  if len(sys.argv) != 2 or sys.argv[1] not in checks:
    sys.exit(f'usage: python scripts/conv_impl_checks.py {{{"|".join(checks)}}}')
  checks[sys.argv[1]]()
