"""The benchmark's peer: Keras 3 on TensorFlow, which is not part of wbc_jax.

The Keras models are wbc_jax.keras_twins (the paper's CNN, CNN-RNN and DCGAN with the same
layers), which tests/test_keras_equivalence.py checks against the Flax models with the same
weights. Keras trains with `train_on_batch` (what `model.fit` runs) and predicts with
`predict_on_batch`; wbc_jax at S = 1 and Keras are timed alternately (A B A B ...) so that a
changing machine load hits both sides alike.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import jax
import numpy as np

from benchmark_tools import NUM_CLASSES, log, timed

LABEL = 'peer: Keras on TensorFlow, not part of wbc_jax'
MODELS = ('cnn', 'cnn_rnn')
# The paper-era Keras count of the CNN-RNN: its cuDNN LSTMs keep a second bias per gate.
PAPER_KERAS_CNN_RNN_PARAMS = 8_926_788


def alternate(jax_steps: Callable[[int], None], keras_steps: Callable[[int], None],
              steps: int, reps: int) -> tuple[list[float], list[float]]:
  """Seconds per step of each side, timed A B A B ... with `steps` steps per turn."""
  jax_times, keras_times = [], []
  for _ in range(reps):
    jax_times.append(timed(lambda: jax_steps(steps)) / steps)
    keras_times.append(timed(lambda: keras_steps(steps)) / steps)
  return jax_times, keras_times


def _pair_summary(prefix: str, batch: int, jax_times, keras_times) -> dict[str, Any]:
  ratios = [k / j for j, k in zip(jax_times, keras_times)]
  return {
      f'{prefix}_wbc_jax_images_per_s': batch / statistics.median(jax_times),
      f'{prefix}_keras_images_per_s': batch / statistics.median(keras_times),
      f'{prefix}_ratio_median': statistics.median(ratios),
      f'{prefix}_ratios': ratios,
      f'{prefix}_wbc_jax_ms': [t * 1e3 for t in jax_times],
      f'{prefix}_keras_ms': [t * 1e3 for t in keras_times],
  }


def bench_keras_classifier(name: str, programs, runner, predict_args: Callable, image_shape,
                           args) -> dict[str, Any]:
  """wbc_jax's `programs` of one seed (`runner` trains them, `predict_args()` feeds predict)
  against the Keras twin of `name`, on the same batch."""
  import keras
  from wbc_jax import keras_twins
  from wbc_jax import models

  keras.utils.set_random_seed(0)
  wbc_params = models.count_params(runner.state.params)
  model = keras_twins.classifier(name, image_shape, NUM_CLASSES)
  keras_twins.compile_classifier(model)
  keras_params = model.count_params()
  x = np.asarray(runner.batch['image'][0])
  y = np.asarray(runner.batch['label'][0])
  log(f'peer {name:8s} params: Keras {keras_params:,}, wbc_jax {wbc_params:,} '
      f'(difference {keras_params - wbc_params:+,})'
      + (f'; the paper-era Keras count with cuDNN LSTMs is {PAPER_KERAS_CNN_RNN_PARAMS:,}'
         if name == 'cnn_rnn' else ''))

  keras_train = lambda n: [model.train_on_batch(x, y) for _ in range(n)]
  keras_predict = lambda n: [model.predict_on_batch(x) for _ in range(n)]

  def jax_predict(n):
    for _ in range(n):
      out = programs.predict(*predict_args())
    jax.block_until_ready(out)

  runner()  # S = 1 was usually compiled by the main section already
  jax_predict(1)
  first_train = timed(lambda: keras_train(1))
  first_predict = timed(lambda: keras_predict(1))
  log(f'peer {name:8s} Keras first train_on_batch {first_train:.2f} s, first '
      f'predict_on_batch {first_predict:.2f} s (jit_compile={model.jit_compile})')
  for _ in range(args.warmup):
    runner()
    keras_train(1)
    jax_predict(1)
    keras_predict(1)

  row = {'model': name, 'batch': args.batch, 'keras_params': keras_params,
         'wbc_jax_params': wbc_params,
         'params_agree': keras_params == wbc_params,
         'keras_jit_compile': bool(model.jit_compile),
         'keras_first_train_step_s': first_train, 'keras_first_predict_s': first_predict,
         'steps_per_turn': args.peer_steps, 'pairs': args.reps}
  if name == 'cnn_rnn':
    row['paper_keras_params_cudnn_lstm'] = PAPER_KERAS_CNN_RNN_PARAMS
  row.update(_pair_summary('train', args.batch,
                           *alternate(runner, keras_train, args.peer_steps, args.reps)))
  log(f'peer {name:8s} train   wbc_jax {row["train_wbc_jax_images_per_s"]:7.1f} img/s, '
      f'Keras {row["train_keras_images_per_s"]:7.1f} img/s, median ratio of pairs '
      f'{row["train_ratio_median"]:.2f}x')
  row.update(_pair_summary('predict', args.batch,
                           *alternate(jax_predict, keras_predict, args.peer_steps, args.reps)))
  log(f'peer {name:8s} predict wbc_jax {row["predict_wbc_jax_images_per_s"]:7.1f} img/s, '
      f'Keras {row["predict_keras_images_per_s"]:7.1f} img/s, median ratio of pairs '
      f'{row["predict_ratio_median"]:.2f}x')
  return row


def bench_keras_gan(config, runner, wbc_params: int, args) -> dict[str, Any]:
  """One paper-GAN step of wbc_jax (`runner`, S = 1, its real batch in [-1, 1]) against the
  Keras twin's `train_on_batch` on the same images."""
  import keras
  from wbc_jax import keras_twins

  keras.utils.set_random_seed(0)
  height, width = runner.batch.shape[2:4]
  gan = keras_twins.paper_gan(height, width, config.latent_dim, config.lr_d, config.b1, config.b2)
  x = np.asarray(runner.batch[0])
  keras_step = lambda n: [gan.train_on_batch(x) for _ in range(n)]

  runner()
  first = timed(lambda: keras_step(1))
  keras_params = (keras_twins.trainable_params(gan.generator)
                  + keras_twins.trainable_params(gan.discriminator))
  log(f'peer gan:paper params (trainable G + D): Keras {keras_params:,}, wbc_jax '
      f'{wbc_params:,}; Keras first train_on_batch {first:.2f} s (jit_compile={gan.jit_compile})')
  for _ in range(args.warmup):
    runner()
    keras_step(1)
  row = {'model': 'gan:paper', 'batch': args.batch, 'keras_params': keras_params,
         'wbc_jax_params': wbc_params, 'params_agree': keras_params == wbc_params,
         'keras_jit_compile': bool(gan.jit_compile), 'keras_first_train_step_s': first,
         'steps_per_turn': 1, 'pairs': args.gan_reps}
  row.update(_pair_summary('train', args.batch,
                           *alternate(runner, keras_step, 1, args.gan_reps)))
  log(f'peer gan:paper step    wbc_jax {row["train_wbc_jax_images_per_s"]:7.1f} real img/s, '
      f'Keras {row["train_keras_images_per_s"]:7.1f} real img/s, median ratio of pairs '
      f'{row["train_ratio_median"]:.2f}x')
  return row
