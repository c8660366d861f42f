r"""Where the strong baseline's augmentation runs fastest: tf.data per image, or JAX on the batch.

  python scripts/benchmark_augment.py [--reps 5] [--out experiments/baseline]

In one process, on random 64x64 crops, 2 seeds x batch 32 (the baseline's step), alternated
rep by rep so that a changing load hits every side alike:
  tfdata     `input_pipeline.train_batches(augment=True)`: the tf.data map of the same kinds
             of operations (flips, rot90, any rotation, colour jitter) that builds an epoch;
  jax        `augment.augment_batch`, jitted and vmapped over the seeds, on one batch
             (flips, rot90, any rotation, scale, shift, colour);
  step       the cellnet train step of configs/baseline.py with the augmentation inside,
  step_bare  and the same step without it.
Prints and writes `<out>/benchmark_augment.{json,md}` with images/s (median over reps) and
the share of the step that the in-step augmentation costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import baseline  # noqa: E402
from wbc_jax import augment  # noqa: E402
from wbc_jax import input_pipeline as ip  # noqa: E402
from wbc_jax import models  # noqa: E402
from wbc_jax import train  # noqa: E402
from wbc_jax import training_set  # noqa: E402
from wbc_jax import utils  # noqa: E402

SEEDS, BATCH, SIZE, STEPS = 2, 32, 64, 8


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'baseline'))
  args = p.parse_args(argv)
  config = baseline.get_config('quick')
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (BATCH * STEPS, SIZE, SIZE, 3), dtype=np.uint8)
  labels = rng.integers(0, 4, len(images)).astype(np.int32)
  tf_aug = ml_collections.ConfigDict({'hflip': True, 'vflip': True, 'rot90': True,
                                      'rotation_deg': 180.0, 'color_jitter': 0.1})

  def run_tfdata(rep):
    ip.train_batches(images, labels, seeds=range(SEEDS), epoch=rep, batch_size=BATCH,
                     aug=tf_aug, augment=True)
    return SEEDS * BATCH * STEPS

  spec = augment.AugmentSpec.from_config(config.augment)
  batch = np.broadcast_to(images[:BATCH].astype(np.float32) / 255,
                          (SEEDS, BATCH, SIZE, SIZE, 3)).copy()
  jax_aug = jax.jit(jax.vmap(lambda x, k: augment.augment_batch(x, k, spec)))
  keys = jax.random.split(jax.random.PRNGKey(0), SEEDS)

  def run_jax(rep):
    for _ in range(STEPS):
      jax.block_until_ready(jax_aug(batch, keys))
    return SEEDS * BATCH * STEPS

  model = models.get_model('cellnet', num_classes=4)
  tx = train.make_optimizer(config.train, total_steps=1000)
  consts = training_set.loss_constants(labels, 4, config.train)
  data = {'image': batch, 'label': labels[:BATCH][None].repeat(SEEDS, 0)}

  def step_runner(options):
    programs = train.make_programs(model, tx, (SIZE, SIZE, 3), options=options)
    holder = {'state': programs.init(train.seed_keys(range(SEEDS)))}

    def run(rep):
      for _ in range(STEPS):
        holder['state'], m = programs.train_step(holder['state'], data, consts)
      jax.block_until_ready(m)
      return SEEDS * BATCH * STEPS
    return run

  with_aug = train.StepOptions.from_config(config, augment=True)
  sides = {'tfdata': run_tfdata, 'jax': run_jax, 'step': step_runner(with_aug),
           'step_bare': step_runner(train.StepOptions(augment=None,
                                                      label_smoothing=with_aug.label_smoothing,
                                                      ema_decay=with_aug.ema_decay))}
  for run in sides.values():  # compile and warm up (epoch numbers are seeds: past the reps)
    run(args.reps)
  rates = {name: [] for name in sides}
  for rep in range(args.reps):
    for name, run in sides.items():
      t0 = time.perf_counter()
      n = run(rep)
      rates[name].append(n / (time.perf_counter() - t0))
  med = {name: statistics.median(v) for name, v in rates.items()}
  share = 1 - med['step'] / med['step_bare']
  result = {
      'command': 'python ' + ' '.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': {'processor': platform.processor() or platform.machine(),
                  'cpus': os.cpu_count(), 'cpu_model': utils.cpu_model()},
      'jax': jax.__version__, 'reps': args.reps, 'seeds': SEEDS, 'batch': BATCH, 'size': SIZE,
      'images_per_second': {k: {'median': med[k], 'all': v} for k, v in rates.items()},
      'in_step_augmentation_share_of_step': share,
  }
  lines = [
      '# Augmentation: tf.data per image or JAX on the batch', '',
      f'`{result["command"]}`, {result["date"]}, {result["machine"]["cpu_model"]} '
      f'({result["machine"]["cpus"]} CPUs), JAX {jax.__version__}; median of {args.reps} '
      f'alternated reps, {SEEDS} seeds x batch {BATCH} at {SIZE}x{SIZE}.', '',
      '| side | images/s |', '| --- | ---: |',
      *[f'| {k} | {med[k]:,.0f} |' for k in sides], '',
      f'The in-step augmentation costs {100 * share:.1f}% of the cellnet train step '
      f'(step {med["step"]:,.0f} vs {med["step_bare"]:,.0f} images/s without it); tf.data would '
      f'add {med["step_bare"] / med["tfdata"]:.2f} s of augmentation per second of training.',
  ]
  text = '\n'.join(lines) + '\n'
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'benchmark_augment.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(args.out, 'benchmark_augment.md'), 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
