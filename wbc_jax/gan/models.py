"""Generator and discriminator networks for GAN augmentation.

Two families share one calling convention so that the train step does not
depend on which one it trains:

  generator(z, labels, train=...)      z [batch, latent], labels [batch] int
                                       -> images [batch, height, width, 3] in [-1, 1]
  discriminator(x, labels, train=...)  x [batch, height, width, 3] in [-1, 1]
                                       -> logits [batch]

* ``PaperGenerator`` / ``PaperDiscriminator``: the unconditional DCGAN of the
  published study, one GAN per class (labels are accepted and ignored).
* ``CondGenerator`` / ``CondDiscriminator``: one class-conditional GAN for all
  classes (conditional batch norm in G, spectral norm and a projection head in
  D), small enough to train on a CPU.

Heights and widths must be multiples of 4 (both generators start at
``height/4 x width/4`` and upsample twice).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from wbc_jax.models import Conv3x3

GAN_KINDS = ('paper', 'cond')

# Keras' default initialisers, so that the published networks start from the
# same distribution as in the study.
_keras_kernel_init = nn.initializers.xavier_uniform()


class Conv(Conv3x3):
  """3x3 'SAME' convolution for the GANs, through `wbc_jax.models.Conv3x3`.

  On CPU its im2col matmul is ~2x faster than XLA's native convolution for these
  layers (see experiments/benchmarks). The class is called `Conv` so that flax names
  its instances 'Conv_0', 'Conv_1', ... exactly as it named the `nn.Conv` layers
  before, and its params ('kernel' [3, 3, cin, cout], 'bias') have the same shapes:
  GAN checkpoints stay loadable. The default initialiser is `nn.Conv`'s.
  """

  padding: str = 'SAME'
  kernel_init: Callable = nn.initializers.lecun_normal()


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
  """Nearest-neighbour upsampling [b, h, w, c] -> [b, 2h, 2w, c]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _check_size(height: int, width: int) -> None:
  if height % 4 or width % 4:
    raise ValueError(f'height and width must be multiples of 4, got {height}x{width}')


class PaperGenerator(nn.Module):
  """Unconditional DCGAN generator of the published study.

  z [b, latent_dim] -> Dense(h/4 * w/4 * 128) -> ReLU -> up -> Conv 256 -> BN
  -> ReLU -> up -> Conv 128 -> BN -> ReLU -> Conv 3 -> tanh -> [b, h, w, 3].
  """

  height: int
  width: int
  latent_dim: int = 100
  # Keras BatchNormalization(momentum=0.8) with its default epsilon.
  bn_momentum: float = 0.8
  bn_epsilon: float = 1e-3
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, z, labels=None, *, train: bool):
    del labels  # one generator per class
    _check_size(self.height, self.width)
    h0, w0 = self.height // 4, self.width // 4
    bn = lambda: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon)
    conv = lambda f: Conv(f, kernel_init=_keras_kernel_init, conv_impl=self.conv_impl)
    x = nn.Dense(h0 * w0 * 128, kernel_init=_keras_kernel_init)(z)
    x = nn.relu(x.reshape(z.shape[0], h0, w0, 128))
    x = nn.relu(bn()(conv(256)(upsample2x(x))))
    x = nn.relu(bn()(conv(128)(upsample2x(x))))
    return jnp.tanh(conv(3)(x))


class PaperDiscriminator(nn.Module):
  """DCGAN discriminator of the published study; returns logits [b].

  The study's sigmoid output is folded into the loss (BCE on logits).
  """

  bn_momentum: float = 0.8
  bn_epsilon: float = 1e-3
  dropout_rate: float = 0.25
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, labels=None, *, train: bool):
    del labels
    conv = lambda f, s: Conv(f, strides=s, kernel_init=_keras_kernel_init,
                             conv_impl=self.conv_impl)
    bn = lambda: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon)
    drop = lambda: nn.Dropout(self.dropout_rate, deterministic=not train)
    act = lambda y: nn.leaky_relu(y, 0.2)

    x = drop()(act(conv(32, 2)(x)))
    x = conv(64, 2)(x)
    # Keras ZeroPadding2D(((0, 1), (0, 1))): one row at the bottom, one column
    # at the right.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    x = drop()(act(bn()(x)))
    x = drop()(act(bn()(conv(128, 2)(x))))
    x = drop()(act(bn()(conv(256, 1)(x))))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(1, kernel_init=_keras_kernel_init)(x)[:, 0]


class ConditionalBatchNorm(nn.Module):
  """BatchNorm whose scale and shift come from the class: x [b,h,w,c], y [b].

  Class embeddings start at zero, so at initialisation this is plain BN.
  """

  num_classes: int
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, labels, *, train: bool):
    c = x.shape[-1]
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                     use_scale=False, use_bias=False)(x)
    gamma = nn.Embed(self.num_classes, c, embedding_init=nn.initializers.zeros,
                     name='gamma')(labels)
    beta = nn.Embed(self.num_classes, c, embedding_init=nn.initializers.zeros,
                    name='beta')(labels)
    return x * (1.0 + gamma[:, None, None, :]) + beta[:, None, None, :]


class GBlock(nn.Module):
  """Residual upsampling block: [b, h, w, cin] -> [b, 2h, 2w, features]."""

  features: int
  num_classes: int
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, labels, *, train: bool):
    h = nn.relu(ConditionalBatchNorm(self.num_classes)(x, labels, train=train))
    h = Conv(self.features, conv_impl=self.conv_impl)(upsample2x(h))
    h = nn.relu(ConditionalBatchNorm(self.num_classes)(h, labels, train=train))
    h = Conv(self.features, conv_impl=self.conv_impl)(h)
    shortcut = nn.Conv(self.features, (1, 1), name='shortcut')(upsample2x(x))
    return h + shortcut


class CondGenerator(nn.Module):
  """Class-conditional residual generator.

  [z, embed(y)] -> Dense(h/4 * w/4 * 2*width) -> GBlock(width) -> GBlock(width)
  -> BN -> ReLU -> Conv 3 -> tanh -> [b, h, w, 3].
  """

  height: int
  width: int
  num_classes: int
  latent_dim: int = 128
  channels: int = 64
  embed_dim: int = 32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, z, labels, *, train: bool):
    _check_size(self.height, self.width)
    h0, w0 = self.height // 4, self.width // 4
    e = nn.Embed(self.num_classes, self.embed_dim, name='class_embed')(labels)
    x = nn.Dense(h0 * w0 * 2 * self.channels)(jnp.concatenate([z, e], axis=-1))
    x = x.reshape(z.shape[0], h0, w0, 2 * self.channels)
    x = GBlock(self.channels, self.num_classes, self.conv_impl)(x, labels, train=train)
    x = GBlock(self.channels, self.num_classes, self.conv_impl)(x, labels, train=train)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return jnp.tanh(Conv(3, conv_impl=self.conv_impl)(x))


def _avg_pool2(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='VALID')


class DBlock(nn.Module):
  """Spectral-normalised residual block, optionally halving h and w.

  ``first`` is the block that sees raw pixels: no ReLU before its first conv
  (it would clip half of the image) and the shortcut pools before its 1x1 conv.
  """

  features: int
  downsample: bool = True
  first: bool = False
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, *, update_stats: bool):
    sn = lambda layer: nn.SpectralNorm(layer)
    h = x if self.first else nn.relu(x)
    conv = lambda: Conv(self.features, conv_impl=self.conv_impl)
    h = sn(conv())(h, update_stats=update_stats)
    h = sn(conv())(nn.relu(h), update_stats=update_stats)
    if self.downsample:
      h = _avg_pool2(h)
    shortcut = x
    if self.first and self.downsample:
      shortcut = _avg_pool2(shortcut)
    if shortcut.shape[-1] != self.features or self.downsample:
      shortcut = sn(nn.Conv(self.features, (1, 1)))(shortcut, update_stats=update_stats)
      if self.downsample and not self.first:
        shortcut = _avg_pool2(shortcut)
    return h + shortcut


class CondDiscriminator(nn.Module):
  """Projection discriminator with spectral norm (Miyato & Koyama 2018).

  x [b, h, w, 3] -> DBlock(width, down) -> DBlock(2 width, down)
  -> DBlock(4 width, down) -> DBlock(4 width) -> ReLU -> sum over h, w -> feat [b, f]
  -> logits = linear(feat) + <embed(y), feat>  [b].

  Spectral-norm power-iteration vectors live in the 'batch_stats' collection
  and advance only when ``train`` is True. Global *sum* pooling makes the
  logits scale with the image area; it works at any size.
  """

  num_classes: int
  channels: int = 64
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, labels, *, train: bool):
    c, impl = self.channels, self.conv_impl
    h = DBlock(c, first=True, conv_impl=impl)(x, update_stats=train)
    h = DBlock(2 * c, conv_impl=impl)(h, update_stats=train)
    h = DBlock(4 * c, conv_impl=impl)(h, update_stats=train)
    h = DBlock(4 * c, downsample=False, conv_impl=impl)(h, update_stats=train)
    feat = jnp.sum(nn.relu(h), axis=(1, 2))
    out = nn.SpectralNorm(nn.Dense(1))(feat, update_stats=train)[:, 0]
    embed = nn.SpectralNorm(nn.Embed(self.num_classes, 4 * c))(labels, update_stats=train)
    return out + jnp.sum(embed * feat, axis=-1)


def build_models(config, height: int, width: int, num_classes: int):
  """(generator, discriminator) of ``config.kind`` (fields kind, latent_dim, channels,
  conv_impl of `config.gan`), for images of height x width."""
  impl = config.conv_impl
  if config.kind == 'paper':
    return (PaperGenerator(height, width, latent_dim=config.latent_dim, conv_impl=impl),
            PaperDiscriminator(conv_impl=impl))
  if config.kind == 'cond':
    return (CondGenerator(height, width, num_classes, latent_dim=config.latent_dim,
                                 channels=config.channels, conv_impl=impl),
            CondDiscriminator(num_classes, channels=config.channels, conv_impl=impl))
  raise ValueError(f'Unknown GAN kind {config.kind!r}; expected one of {GAN_KINDS}')
