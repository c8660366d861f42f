"""Classifiers for white-blood-cell images.

* `CNN` and `CNNRNN` reproduce the two Keras models of the published paper, layer for layer and
  parameter for parameter, on its 60x80x3 input.
* `ResNet` is a stronger small residual net for the square `crop` view; `cellnet` is a
  ResNet sized for a 2-core CPU (a stride-2 stem, one block per stage, ~0.3 M parameters).

All models take float32 images, in [0, 1] or standardised per channel with the training
images' statistics (`config.train.standardize`, applied by the train state), shaped
`[batch, height, width, 3]`, and return logits `[batch, num_classes]`. Their `__call__` takes
`train` as a keyword: it switches dropout (rng collection 'dropout') and, in `ResNet`, batch
norm (train=True needs `mutable=['batch_stats']`). No model keeps Python-side state, so a
`jax.vmap` over a leading seed axis of the variables trains several seeds at once.

The 3x3 convolutions go through `Conv3x3`, whose `conv_impl` picks between XLA's native
convolution, an equivalent im2col matmul and oneDNN's direct convolutions (an XLA FFI custom
call, `wbc_jax.onednn_conv`), because on CPU the native convolution is several times slower
than the other two. 'auto' takes oneDNN on CPU where its library is built, else the matmul,
and XLA's convolution on GPU and TPU.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from wbc_jax import onednn_conv

Array = jax.Array
Initializer = Callable[..., Array]

# The networks `get_model` builds, with their names in the report's tables.
MODEL_LABELS = {'cnn': 'CNN', 'cnn_rnn': 'CNN-RNN', 'resnet': 'ResNet', 'cellnet': 'cellnet'}
MODEL_NAMES = tuple(MODEL_LABELS)
CONV_IMPLS = ('xla', 'matmul', 'onednn', 'auto')
PADDINGS = ('VALID', 'SAME')


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s).

  A stacked seed axis is counted too: for per-seed params, divide by the number of seeds.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------


_logged_auto_choice: set[tuple[str, str]] = set()


def resolve_conv_impl(conv_impl: str) -> str:
  """The implementation `conv_impl` runs as here ('xla' | 'matmul' | 'onednn'): 'auto' is
  mapped to the fastest one on the current backend; the name is validated.

  'auto' is 'onednn' on CPU when its library loads, else 'matmul' there, and 'xla' on GPU and
  TPU; the choice is logged once per process. An explicit 'onednn' that cannot run raises.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(
        f"unknown conv_impl {conv_impl!r}; expected one of {', '.join(CONV_IMPLS)}"
    )
  backend = jax.default_backend()
  if conv_impl == 'auto':
    if backend != 'cpu':
      resolved, why = 'xla', f'on {backend}'
    elif onednn_conv.available():
      resolved, why = 'onednn', f'oneDNN {onednn_conv.version()} on CPU'
    else:
      resolved, why = 'matmul', f'on CPU, oneDNN unavailable: {onednn_conv.load_error()}'
    if (resolved, backend) not in _logged_auto_choice:
      _logged_auto_choice.add((resolved, backend))
      logging.info("conv_impl 'auto' -> %r (%s)", resolved, why)
    return resolved
  if conv_impl == 'onednn':
    if backend != 'cpu':
      raise ValueError(f"conv_impl 'onednn' runs on CPU only, the backend is {backend}")
    if not onednn_conv.available():
      raise ValueError(f"conv_impl 'onednn' unavailable: {onednn_conv.load_error()}")
  return conv_impl


def _same_pads(size: int, stride: int, kernel_size: int = 3) -> tuple[int, int]:
  """(before, after) padding of one spatial axis, as XLA and TensorFlow do for 'SAME'.

  The output has ceil(size / stride) positions; an odd total puts the extra row or column
  after, so that stride-2 results match `nn.Conv(padding='SAME')` exactly.
  """
  total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


def _conv3x3_matmul(x: Array, kernel: Array, stride: int) -> Array:
  """im2col convolution of an already padded input.

  Args:
    x: [batch, height, width, cin], padded.
    kernel: [3, 3, cin, cout] (HWIO).
    stride: the same in both spatial axes.

  Returns:
    [batch, out_height, out_width, cout], out_size = (size - 3) // stride + 1.
  """
  _, height, width, cin = x.shape
  out_h = (height - 3) // stride + 1
  out_w = (width - 3) // stride + 1
  # Patches are laid out (kh, kw, cin) along the last axis, which is the row-major order of
  # the HWIO kernel, so the kernel flattens with a plain reshape.
  patches = jnp.concatenate(
      [
          x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
          for i in range(3)
          for j in range(3)
      ],
      axis=-1,
  )  # [batch, out_h, out_w, 9 * cin]
  return patches @ kernel.reshape(9 * cin, kernel.shape[-1])


class Conv3x3(nn.Module):
  """3x3 convolution with a choice of implementation.

  Its params are named and shaped like `nn.Conv(features, (3, 3))` ('kernel' [3, 3, cin,
  features], 'bias' [features]), so the two are interchangeable.

  Attributes:
    features: output channels.
    strides: stride in both spatial axes.
    padding: 'VALID' or 'SAME' (XLA/TensorFlow SAME, also for stride 2).
    use_bias: add a bias (off before batch norm, which has its own shift).
    conv_impl: 'xla' (lax.conv_general_dilated), 'matmul' (im2col: 9 shifted slices and one
      matmul; on CPU XLA's native convolution is ~4-5x slower than its matmul), 'onednn'
      (oneDNN's direct convolution as an XLA custom call, CPU only, `wbc_jax.onednn_conv`) or
      'auto' ('onednn' on CPU when its library is built, else 'matmul'; 'xla' elsewhere).
    kernel_init: glorot_uniform by default, as Keras.
    bias_init: zeros.
  """

  features: int
  strides: int = 1
  padding: str = 'VALID'
  use_bias: bool = True
  conv_impl: str = 'auto'
  kernel_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[batch, height, width, cin] -> [batch, out_height, out_width, features]."""
    impl = resolve_conv_impl(self.conv_impl)
    if self.padding not in PADDINGS:
      raise ValueError(
          f"unknown padding {self.padding!r}; expected one of {', '.join(PADDINGS)}"
      )
    kernel = self.param(
        'kernel', self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32
    )
    if self.padding == 'SAME':
      pads = [_same_pads(size, self.strides) for size in x.shape[1:3]]
    else:
      pads = [(0, 0), (0, 0)]

    if impl == 'xla':
      y = lax.conv_general_dilated(
          x,
          kernel,
          window_strides=(self.strides, self.strides),
          padding=pads,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
    elif impl == 'onednn':
      y = onednn_conv.conv2d(x, kernel, self.strides, pads)
    else:
      if any(p for pair in pads for p in pair):
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
      y = _conv3x3_matmul(x, kernel, self.strides)

    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32)
    return y


# --------------------------------------------------------------------------------------------
# The paper's models
# --------------------------------------------------------------------------------------------


def _dense(features: int, name: str | None = None) -> nn.Dense:
  """Dense layer with Keras's default initialisation (glorot_uniform kernel, zero bias)."""
  return nn.Dense(
      features,
      kernel_init=nn.initializers.glorot_uniform(),
      bias_init=nn.initializers.zeros_init(),
      name=name,
  )


def _max_pool_2x2(x: Array) -> Array:
  """[b, h, w, c] -> [b, h // 2, w // 2, c]; an odd last row or column is dropped, as Keras.

  A reshape and a max over the window axes, the same values as `nn.max_pool` (2x2,
  stride 2, VALID). Its gradient is an elementwise mask, where XLA:CPU lowers the
  gradient of `reduce_window` to a scatter that cost ~5% of a CNN train step. The two
  differ only where a window holds several equal maxima (the mask splits the gradient
  among them, the scatter gives it to the first): after a ReLU those are zeros, whose
  gradient the ReLU stops anyway.
  """
  b, h, w, c = x.shape
  x = x[:, : h - h % 2, : w - w % 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ClassifierHead(nn.Module):
  """Dense 128 ReLU -> Dropout 0.5 -> Dense num_classes, the paper's head for both models."""

  num_classes: int
  hidden: int = 128
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, features: Array, *, train: bool) -> Array:
    """[batch, features] -> logits [batch, num_classes]."""
    x = nn.relu(_dense(self.hidden)(features))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return _dense(self.num_classes)(x)


class CNN(nn.Module):
  """The paper's CNN.

  Conv3x3 32 -> ReLU -> Conv3x3 64 -> ReLU -> Conv3x3 64 -> ReLU (VALID) -> max-pool 2 ->
  Dropout 0.25 -> flatten -> Dense 128 ReLU -> Dropout 0.5 -> Dense num_classes.
  On 60x80x3 input the flattened features are 27*37*64 = 63,936 and the model has 8,240,772
  parameters, the same as the Keras original.
  """

  num_classes: int = 4
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Images [batch, height, width, 3] in [0, 1] -> logits [batch, num_classes]."""
    for features in (32, 64, 64):
      x = nn.relu(Conv3x3(features, conv_impl=self.conv_impl)(x))
    x = _max_pool_2x2(x)
    x = nn.Dropout(0.25, deterministic=not train)(x)
    # Row-major flatten of NHWC, the order Keras's Flatten uses on channels-last tensors.
    x = x.reshape(x.shape[0], -1)
    return ClassifierHead(self.num_classes)(x, train=train)


def _keras_lstm_kernel_init(num_gates: int = 4) -> Initializer:
  """glorot_uniform as Keras draws it for its fused [in, 4 * units] LSTM input kernel.

  flax's LSTMCell keeps one [in, units] kernel per gate, and plain glorot_uniform on that
  shape would draw from a wider range (fan_out = units instead of 4 * units).
  """

  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    fan_in, units = shape
    limit = math.sqrt(6.0 / (fan_in + num_gates * units))
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def _orthogonal_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
  """Random orthogonal matrix (orthonormal columns or rows), as `nn.initializers.orthogonal()`.

  Gram-Schmidt on a Gaussian matrix, with matmuls only: normalising each new column keeps
  R's diagonal positive, so Q has the same (Haar) distribution as flax's sign-corrected QR.
  flax's initializer calls LAPACK's QR; on CPU (jaxlib 0.10.2), a jitted program with several
  batched QRs, which `jax.jit(jax.vmap(init))` over seeds makes of the recurrent kernels, can
  deadlock XLA's runtime (unless --xla_cpu_enable_concurrency_optimized_scheduler=false).

  Args:
    key: PRNG key.
    shape: [rows, cols].
    dtype: of the result.

  Returns:
    [rows, cols] with orthonormal columns (rows >= cols) or orthonormal rows (rows < cols).
  """
  rows, cols = shape
  tall = rows >= cols
  n, k = (rows, cols) if tall else (cols, rows)
  a = jax.random.normal(key, (n, k), jnp.float32)

  def add_column(j, q):
    v = a[:, j]
    # Columns >= j of q are still zero, so projecting on all of q projects on those < j.
    # Two passes of classical Gram-Schmidt are as accurate in float32 as Householder QR.
    for _ in range(2):
      v = v - q @ (q.T @ v)
    return q.at[:, j].set(v / jnp.linalg.norm(v))

  q = lax.fori_loop(0, k, add_column, jnp.zeros((n, k), jnp.float32))
  return (q if tall else q.T).astype(dtype)


class KerasLSTMCell(nn.LSTMCell):
  """flax's LSTMCell with Keras's forget-gate bias: 1 at init (unit_forget_bias), 0 elsewhere.

  Keras starts the forget gate's bias at 1 so that, early in training, the cell keeps its state
  rather than forgetting it; flax's LSTMCell draws all four gates' biases from one `bias_init`.
  Same gates, parameter names and shapes as flax's cell ('ii', 'hi', 'if', 'hf', ...), so
  parameter trees and checkpoints keep their structure.
  """

  forget_bias: float = 1.0

  @nn.compact
  def __call__(self, carry, inputs):
    """carry (c, h) each [batch, units], inputs [batch, features] -> ((c, h), h)."""
    c, h = carry
    units = h.shape[-1]

    def gate(name: str, bias_init: Initializer) -> Array:
      # Input and recurrent kernels are summed, so only the recurrent Dense holds the bias.
      x = nn.Dense(units, use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f'i{name}')(inputs)
      return x + nn.Dense(units, use_bias=True, kernel_init=self.recurrent_kernel_init,
                          bias_init=bias_init, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f'h{name}')(h)

    i = self.gate_fn(gate('i', self.bias_init))
    f = self.gate_fn(gate('f', nn.initializers.constant(self.forget_bias)))
    g = self.activation_fn(gate('g', self.bias_init))
    o = self.gate_fn(gate('o', self.bias_init))
    new_c = f * c + i * g
    new_h = o * self.activation_fn(new_c)
    return (new_c, new_h), new_h


def _lstm_cell(units: int) -> nn.LSTMCell:
  """Keras-like LSTM cell: glorot input kernels, orthogonal recurrent kernels, zero biases
  but for the forget gate's, which starts at 1 as Keras's (unit_forget_bias=True) does."""
  return KerasLSTMCell(
      units,
      parent=None,  # unbound, so that the RNN that receives it adopts it as 'cell'
      kernel_init=_keras_lstm_kernel_init(),
      recurrent_kernel_init=_orthogonal_init,
      bias_init=nn.initializers.zeros_init(),
  )


def _bidirectional_lstm(units: int, name: str) -> nn.Bidirectional:
  """Forward and backward LSTMs; the backward outputs are put back in time order."""
  # Built unbound so that each module nests under the one it is passed to, giving params
  # '<name>/{forward_rnn,backward_rnn}/cell/...'.
  return nn.Bidirectional(
      nn.RNN(_lstm_cell(units), parent=None),
      nn.RNN(_lstm_cell(units), parent=None),
      name=name,
  )


class BiLSTMEncoder(nn.Module):
  """Two stacked bidirectional LSTMs that encode a sequence into one vector.

  Keras semantics: the first layer returns sequences (forward and backward outputs
  concatenated per step); the second returns, per direction, the output after reading its
  whole sequence: the forward LSTM's output at the last step and the backward LSTM's output
  after reading from the last step back to the first.
  """

  units: int = 64

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[batch, steps, features] -> [batch, 2 * units]."""
    x = _bidirectional_lstm(self.units, 'bilstm_1')(x)  # [batch, steps, 2 * units]
    ((_, h_forward), (_, h_backward)), _ = _bidirectional_lstm(self.units, 'bilstm_2')(
        x, return_carry=True
    )
    return jnp.concatenate([h_forward, h_backward], axis=-1)


class CNNRNN(nn.Module):
  """The paper's CNN-RNN: a convolutional and a recurrent branch, concatenated.

  CNN branch: Conv3x3 32 -> ReLU -> Conv3x3 64 -> ReLU (VALID) -> max-pool 2 -> Dropout 0.25
  -> flatten (28*38*64 = 68,096 features at 60x80).
  RNN branch: the image averaged over its colour channels, read as `height` time steps of
  `width` values -> `BiLSTMEncoder` (2 * lstm_units) -> Dropout 0.25.
  Head: concatenation -> Dense 128 ReLU -> Dropout 0.5 -> Dense num_classes.

  At 60x80x3 this has 8,925,764 parameters. Keras reports 8,926,788 for the original because
  its cuDNN LSTMs keep a second (recurrent) bias per gate: 4 LSTMs * 4 gates * 64 = 1,024
  more.
  """

  num_classes: int = 4
  conv_impl: str = 'auto'
  lstm_units: int = 64

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Images [batch, height, width, 3] in [0, 1] -> logits [batch, num_classes]."""
    c = x
    for features in (32, 64):
      c = nn.relu(Conv3x3(features, conv_impl=self.conv_impl)(c))
    c = _max_pool_2x2(c)
    c = nn.Dropout(0.25, deterministic=not train)(c)
    c = c.reshape(c.shape[0], -1)

    r = BiLSTMEncoder(self.lstm_units)(x.mean(axis=-1))  # rows are the time steps
    r = nn.Dropout(0.25, deterministic=not train)(r)

    return ClassifierHead(self.num_classes)(jnp.concatenate([c, r], axis=-1), train=train)


# --------------------------------------------------------------------------------------------
# Residual net for the crop view
# --------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
  """Basic block: Conv3x3-BN-ReLU-Conv3x3-BN, plus the shortcut, then ReLU.

  The shortcut is a strided 1x1 projection with batch norm when the stride or the width
  changes, the identity otherwise.
  """

  features: int
  strides: int = 1
  conv_impl: str = 'auto'
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """[b, h, w, cin] -> [b, ceil(h / strides), ceil(w / strides), features]."""
    norm = lambda **kw: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, **kw
    )
    conv = lambda strides: Conv3x3(
        self.features, strides, 'SAME', use_bias=False, conv_impl=self.conv_impl
    )
    y = nn.relu(norm()(conv(self.strides)(x)))
    # Zero-initialised last scale: every block starts as the identity, which makes the
    # net train like a shallower one early on (as in flax's ImageNet ResNet).
    y = norm(scale_init=nn.initializers.zeros_init())(conv(1)(y))

    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      # A 1x1 SAME convolution with stride s reads exactly x[::s, ::s], so it is a Dense.
      shortcut = x[:, :: self.strides, :: self.strides]
      shortcut = nn.Dense(self.features, use_bias=False, name='proj')(shortcut)
      shortcut = norm(name='proj_bn')(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Small residual net for square crops (e.g. 64x64 or 96x96).

  Stem Conv3x3 widths[0] SAME (stride `stem_strides`) + BN + ReLU; then one stage per width, each of
  `blocks_per_stage` `ResidualBlock`s, the first block of every stage after the first with
  stride 2; global average pool -> Dropout -> Dense num_classes. Global pooling makes the
  parameter count independent of the input size.
  """

  num_classes: int = 4
  conv_impl: str = 'auto'
  widths: tuple[int, ...] = (32, 64, 128)
  blocks_per_stage: int = 2
  dropout_rate: float = 0.2
  bn_momentum: float = 0.9
  stem_strides: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Images [batch, height, width, 3] -> logits [batch, num_classes]."""
    x = Conv3x3(self.widths[0], self.stem_strides, padding='SAME', use_bias=False,
                conv_impl=self.conv_impl)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
    x = nn.relu(x)
    for stage, features in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(features, strides, self.conv_impl, self.bn_momentum)(x, train=train)
    x = x.mean(axis=(1, 2))  # [batch, widths[-1]]
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return _dense(self.num_classes)(x)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

def CellNet(**kwargs) -> ResNet:  # pylint: disable=invalid-name
  """The crop network of the strong baseline (`configs/baseline.py`): a ResNet for 64 px
  windows on a 2-core CPU. The stride-2 stem halves the resolution before any block (a
  64 px window holds a ~45 px cell, whose lobes and granules survive at 32x32 features),
  and one block per stage of widths 16-128 keeps 308,052 parameters at ~230 train
  images/s per core pair (scripts/benchmark.py), so thousands of updates fit in minutes."""
  return ResNet(**{'widths': (16, 32, 64, 128), 'blocks_per_stage': 1, 'stem_strides': 2,
                   **kwargs})


_MODELS: dict[str, Callable[..., nn.Module]] = {
    'cnn': CNN, 'cnn_rnn': CNNRNN, 'resnet': ResNet, 'cellnet': CellNet}


def get_model(name: str, *, num_classes: int, conv_impl: str = 'auto', **kwargs) -> nn.Module:
  """Builds the model called `name` (one of `MODEL_NAMES`); kwargs go to its constructor."""
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
  resolve_conv_impl(conv_impl)  # fail here rather than at the first trace
  return _MODELS[name](num_classes=num_classes, conv_impl=conv_impl, **kwargs)
