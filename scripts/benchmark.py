r"""Throughput benchmark of wbc_jax on one machine, with a Keras peer for reference.

Usage (from the repository root):

  python scripts/benchmark.py                       # all models, S = 1, 4, 8, Keras peer
  python scripts/benchmark.py --models cnn --seeds 1 --reps 2 --skip_keras   # a quick look

In one process it measures, in this order:

1. a float32 matmul peak (an N x N @ N x N jitted product, median GFLOP/s), the reference
   for every "% of peak" below;
2. for each model and each number of seeds S: wbc_jax's own seed-vmapped programs
   (`wbc_jax.train.make_programs`): the compile time of the train step and of predict (trace +
   lower + compile, then the first call on its own), the median time of one train step and of
   one predict step, the FLOPs of each step from XLA's cost analysis, achieved GFLOP/s, and the
   compiled programs' memory (arguments + outputs + temporaries, from
   `compiled.memory_analysis()`). A program that would need more host memory than is available
   is not run; its row says so;
3. GAN steps (`wbc_jax.gan.train.gan_train_step`, both kinds, vmapped over S);
4. a peer, Keras 3 on TensorFlow, which is not part of wbc_jax (scripts/benchmark_keras.py):
   the paper's CNN and CNN-RNN (and its DCGAN step) written in Keras with the same layers
   (`wbc_jax.keras_twins`), trained with what `model.fit` runs by default, timed alternately
   with wbc_jax at S = 1 (A B A B ...) so that a changing machine load hits both sides alike.

Images/s counts every image a step processes: S * batch for the train step (each seed trains
on its own batch) and S * batch predictions for predict (all seeds predict the same batch).

Results go to `<out>/benchmark.json` and `<out>/benchmark.md` (scripts/benchmark_markdown.py),
with the machine, the date, the versions, the thread settings and the exact command line. The
measuring tools (timing, FLOPs and memory of compiled programs) are
scripts/benchmark_tools.py.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import shlex
import sys
from typing import Any

import jax
import jax.numpy as jnp

# Compile times are measured here: a persistent compilation cache (the test suite sets one
# through JAX_COMPILATION_CACHE_DIR) would time a disk read instead of XLA.
jax.config.update('jax_enable_compilation_cache', False)

# Read when TensorFlow and Keras are first imported, which happens later (wbc_jax imports
# TensorFlow for its input pipeline; nothing above does).
os.environ['KERAS_BACKEND'] = 'tensorflow'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import benchmark_keras as peer_lib  # noqa: E402
import benchmark_markdown  # noqa: E402
from benchmark_tools import (NUM_CLASSES, TrainRunner, compile_program, elapsed,  # noqa: E402
                             flops_text, log, machine_info, make_batch, maxrss_mb, mb,
                             measure_matmul_peak, median_time, memory_shortfall,
                             program_stats, rate_fields, thread_settings, timed, versions)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, 'experiments', 'benchmarks')

# The frame view (the paper's input) for the paper's models and the GANs; the crop view for
# the residual net.
IMAGE_SHAPES = {'cnn': (60, 80, 3), 'cnn_rnn': (60, 80, 3), 'resnet': (64, 64, 3),
                'cellnet': (64, 64, 3)}
GAN_IMAGE_SHAPE = (60, 80, 3)
GAN_KINDS = ('paper', 'cond')


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x.strip()]


def _name_list(text: str) -> list[str]:
  return [x.strip() for x in text.split(',') if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', type=_name_list, default=['cnn', 'cnn_rnn', 'resnet', 'cellnet'],
                 help='comma-separated classifiers (cnn, cnn_rnn, resnet, cellnet; cellnet '
                 "is timed with the strong baseline's step: in-step augmentation and EMA)")
  p.add_argument('--seeds', type=_int_list, default=[1, 4, 8],
                 help='comma-separated numbers of seeds S trained at once')
  p.add_argument('--batch', type=int, default=32, help='images per seed per step')
  p.add_argument('--reps', type=int, default=5, help='timed repetitions of each step')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps after the first call')
  p.add_argument('--conv_impl', default='auto', choices=('auto', 'xla', 'matmul', 'onednn'),
                 help="wbc_jax's 3x3 convolution (see wbc_jax.models.Conv3x3)")
  p.add_argument('--matmul_size', type=int, default=2048, help='N of the reference matmul')
  p.add_argument('--gan_seeds', type=_int_list, default=[1],
                 help='S of the GAN steps; a paper-GAN step at batch 32 is ~0.5 TFLOP, so '
                      'only S = 1 by default')
  p.add_argument('--gan_kinds', type=_name_list, default=list(GAN_KINDS),
                 help='comma-separated GAN kinds (paper, cond)')
  p.add_argument('--gan_reps', type=int, default=3,
                 help='timed repetitions of each GAN step (and Keras GAN pairs)')
  p.add_argument('--skip_gan', action='store_true', help='leave out the GAN steps')
  p.add_argument('--skip_keras', action='store_true', help='leave out the Keras peer')
  p.add_argument('--peer_steps', type=int, default=2,
                 help='steps per side in each A/B repetition of the Keras comparison')
  p.add_argument('--out', default=DEFAULT_OUT, help='directory for benchmark.{json,md}')
  p.add_argument('--devices', type=int, default=0,
                 help='emulate this many CPU devices and split the S seeds of the classifier '
                      'train step over them (see build_programs); 0: the real devices')
  args = p.parse_args(argv)
  unknown = sorted(set(args.models) - set(IMAGE_SHAPES))
  if unknown:
    p.error(f'unknown models {unknown}; expected some of {sorted(IMAGE_SHAPES)}')
  unknown = sorted(set(args.gan_kinds) - set(GAN_KINDS))
  if unknown:
    p.error(f'unknown GAN kinds {unknown}; expected some of {list(GAN_KINDS)}')
  if (not args.seeds or min(args.seeds + args.gan_seeds) < 1 or args.batch < 1
      or min(args.reps, args.gan_reps, args.peer_steps) < 1):
    p.error('--seeds, --gan_seeds, --batch, --reps, --gan_reps and --peer_steps must be '
            'positive')
  return args


# ------------------------------------------------------------------------------------------
# wbc_jax classifiers
# ------------------------------------------------------------------------------------------


def train_config():
  """configs/ablation.py's config.train: Adam at 1e-3, the paper's (the optimizer's state is
  what a train step updates)."""
  sys.path.insert(0, ROOT)
  from configs import ablation
  return ablation.get_config().train


def step_options(name: str):
  """The train step's options: the strong baseline's for cellnet (configs/baseline.py:
  augmentation inside the step, EMA, TTA is an evaluation matter), none for the others."""
  from wbc_jax import train

  if name != 'cellnet':
    return train.StepOptions()
  sys.path.insert(0, ROOT)
  from configs import baseline
  return train.StepOptions.from_config(baseline.get_config('quick'), augment=True)


def build_programs(name: str, conv_impl: str, seeds: int = 1):
  """wbc_jax's seed-vmapped programs of `name`. With several devices (--devices) the S seeds
  are split over them along the mesh's seed axis, on the largest number of devices that
  divides S (S = 4 on 4 devices: one seed per device; S = 1: one device), as
  `wbc_jax.sharding.check_divisible` requires."""
  from wbc_jax import models, sharding, train

  devices = jax.devices()[:math.gcd(seeds, jax.device_count())]
  model = models.get_model(name, num_classes=NUM_CLASSES, conv_impl=conv_impl)
  return train.make_programs(model, train.make_optimizer(train_config()), IMAGE_SHAPES[name],
                             sharding.make_mesh(None, devices), options=step_options(name))


def emulate_cpu_devices(n: int) -> None:
  """Makes the CPU backend show `n` devices; before anything has started it.

  The emulated devices share this machine's cores: more devices only split the same
  compute, so their figures show the cost of sharding, not a speed-up.
  """
  jax.config.update('jax_num_cpu_devices', n)
  if jax.device_count() != n:
    raise SystemExit(f'--devices={n}: the backend shows {jax.device_count()} devices '
                     '(it was started before the flag could apply, or is not the CPU)')


def count_all_devices(row: dict[str, Any], mesh) -> None:
  """Records the mesh; FLOPs of all its devices, where XLA's cost analysis counts one.

  A program split over devices is compiled once per device: its cost analysis, and so
  the GFLOP/step, GFLOP/s and % of peak that `bench_classifier` derives, are one
  device's share. Times and images/s are already the whole step's.
  """
  row['mesh'] = dict(mesh.shape)
  for prefix in ('train', 'predict'):
    for key in ('gflop_per_step', 'gflop_per_s', 'fraction_of_peak'):
      if row.get(f'{prefix}_{key}') is not None:
        row[f'{prefix}_{key}'] *= mesh.size


def prepare_classifier(programs, seeds: int, batch: int, image_shape):
  """(TrainRunner, predict closure, predict args) of S seeds, nothing compiled yet."""
  from wbc_jax import train

  state = programs.init(train.seed_keys(range(seeds)))
  data = make_batch(seeds, batch, image_shape)
  batch_dev = jax.device_put(data)
  runner = TrainRunner(programs.train_step, state, batch_dev,
                       {'class_weights': jnp.ones((NUM_CLASSES,), jnp.float32),
                        'logit_offset': jnp.zeros((NUM_CLASSES,), jnp.float32)})
  images = batch_dev['image'][0]

  def predict_args():
    return runner.state.params, runner.state.batch_stats, images, runner.state.predict_consts

  return runner, predict_args


def bench_classifier(name: str, programs, seeds: int, args, peak: float,
                     flop_programs=None) -> dict[str, Any]:
  """flop_programs: programs of the same model whose compiled cost analysis counts every
  FLOP (the matmul convolution), when `programs` hide theirs in custom calls."""
  from wbc_jax import models

  image_shape = IMAGE_SHAPES[name]
  runner, predict_args = prepare_classifier(programs, seeds, args.batch, image_shape)
  jax.block_until_ready(runner.state)
  row = {'model': name, 'seeds': seeds, 'batch': args.batch, 'image_shape': list(image_shape),
         'params_per_seed': models.count_params(runner.state.params) // seeds}
  tag = f'{name:8s} S={seeds}'

  compile_train, compiled = compile_program(programs.train_step, runner.state, runner.batch,
                                            runner.class_weights)
  train_stats = program_stats(compiled)
  log(f'{tag}  train step compile (trace + lower + compile): {compile_train:.2f} s, '
      f'program memory {mb((train_stats["memory_bytes"] or {}).get("total"))} MB')
  shortfall = memory_shortfall(train_stats)
  if shortfall:
    log(f'{tag}  skipped: {shortfall}')
    return {**row, 'skipped': shortfall, 'train_memory_bytes': train_stats['memory_bytes']}
  first_train = timed(runner)
  log(f'{tag}  train step first call: {first_train:.2f} s')

  compile_predict, compiled = compile_program(programs.predict, *predict_args())
  predict_stats = program_stats(compiled)
  if flop_programs is not None:
    for stats, fn, fn_args in (
        (train_stats, flop_programs.train_step, (runner.state, runner.batch,
                                                 runner.class_weights)),
        (predict_stats, flop_programs.predict, predict_args())):
      stats['flops'] = program_stats(compile_program(fn, *fn_args)[1])['flops']
  predict = lambda: jax.block_until_ready(programs.predict(*predict_args()))
  first_predict = timed(predict)
  log(f'{tag}  predict compile (trace + lower + compile): {compile_predict:.2f} s, '
      f'first call {first_predict:.2f} s')
  row.update(compile_train_s=compile_train, first_call_train_s=first_train,
             compile_predict_s=compile_predict, first_call_predict_s=first_predict)

  runner(args.warmup)
  train_s, train_times = median_time(runner, args.reps)
  images = seeds * args.batch
  row.update(rate_fields('train', train_s, images, train_stats['flops'], peak))
  log(f'{tag}  train   {train_s * 1e3:9.1f} ms/step  '
      f'{row["train_images_per_s"]:8.1f} img/s  ' + flops_text(row, 'train'))

  for _ in range(args.warmup):
    predict()
  predict_s, predict_times = median_time(predict, args.reps)
  row.update(rate_fields('predict', predict_s, images, predict_stats['flops'], peak))
  log(f'{tag}  predict {predict_s * 1e3:9.1f} ms/step  '
      f'{row["predict_images_per_s"]:8.1f} img/s  ' + flops_text(row, 'predict'))

  row.update(train_times_ms=[t * 1e3 for t in train_times],
             predict_times_ms=[t * 1e3 for t in predict_times],
             train_memory_bytes=train_stats['memory_bytes'],
             predict_memory_bytes=predict_stats['memory_bytes'],
             process_maxrss_mb=maxrss_mb())
  log(f'{tag}  process peak RSS so far {row["process_maxrss_mb"]:.0f} MB')
  return row


# ------------------------------------------------------------------------------------------
# wbc_jax GANs
# ------------------------------------------------------------------------------------------


def gan_config(kind: str, batch: int, conv_impl: str = 'auto'):
  """configs/ablation.py's GAN config of `kind`, at this batch size and conv_impl."""
  sys.path.insert(0, ROOT)
  from configs import ablation
  config = ablation.gan_config(kind)
  config.batch_size = batch
  config.conv_impl = conv_impl
  return config


def init_gan(config, seeds: int):
  """S fresh GANs of `config`, stacked, by the training runs' own init."""
  from wbc_jax.gan import train as gan_train
  height, width, _ = GAN_IMAGE_SHAPE
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds, dtype=jnp.uint32))
  return gan_train.init_gan_states(keys, config, height=height, width=width,
                                   num_classes=NUM_CLASSES)


def gan_params(state) -> int:
  from wbc_jax import models
  return models.count_params(state.g_params) + models.count_params(state.d_params)


@functools.cache
def gan_program(kind: str, batch: int, conv_impl: str = 'auto'):
  """(config, jitted step) of one GAN kind, made once so that its compilations are reused:
  `gan_train_step` (one D then one G step, on a given real batch) vmapped over a leading
  member axis, the state donated."""
  from wbc_jax.gan import train as gan_train
  config = gan_config(kind, batch, conv_impl)
  step = functools.partial(gan_train.gan_train_step, config=config, num_classes=NUM_CLASSES)
  return config, jax.jit(jax.vmap(step), donate_argnums=0)


def bench_gan(kind: str, seeds: int, args, peak: float) -> dict[str, Any]:
  config, step = gan_program(kind, args.batch, args.conv_impl)
  state = init_gan(config, seeds)
  data = make_batch(seeds, args.batch, GAN_IMAGE_SHAPE, seed=1)
  real = jax.device_put(data['image'] * 2.0 - 1.0)  # the GANs work in [-1, 1]
  labels = jax.device_put(data['label'])
  params = gan_params(state) // seeds
  runner = TrainRunner(step, state, real, labels)

  tag = f'gan:{kind:5s} S={seeds}'
  row = {'kind': kind, 'seeds': seeds, 'batch': args.batch,
         'image_shape': list(GAN_IMAGE_SHAPE), 'params_per_seed': params}
  compile_s, compiled = compile_program(step, runner.state, real, labels)
  stats = program_stats(compiled)
  log(f'{tag}  step compile (trace + lower + compile): {compile_s:.2f} s, program memory '
      f'{mb((stats["memory_bytes"] or {}).get("total"))} MB')
  shortfall = memory_shortfall(stats)
  if shortfall:
    log(f'{tag}  skipped: {shortfall}')
    return {**row, 'skipped': shortfall, 'memory_bytes': stats['memory_bytes']}
  first_call = timed(runner)
  log(f'{tag}  step first call: {first_call:.2f} s')
  runner(args.warmup)
  seconds, times = median_time(runner, args.gan_reps)
  row.update(compile_s=compile_s, first_call_s=first_call)
  row.update(rate_fields('step', seconds, seeds * args.batch, stats['flops'], peak))
  row.update(step_times_ms=[t * 1e3 for t in times], memory_bytes=stats['memory_bytes'],
             process_maxrss_mb=maxrss_mb())
  log(f'{tag}  step {seconds * 1e3:9.1f} ms/step  '
      f'{row["step_images_per_s"]:8.1f} real img/s  ' + flops_text(row, 'step'))
  return row


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.devices:
    emulate_cpu_devices(args.devices)
  argv = sys.argv[1:] if argv is None else argv
  command = 'python scripts/benchmark.py' + (' ' + shlex.join(argv) if argv else '')
  settings = thread_settings()
  from wbc_jax import models

  result: dict[str, Any] = {
      'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
      'command': command,
      'args': {k: v for k, v in vars(args).items()},
      'machine': machine_info(),
      'versions': versions(),
      'settings': settings,
      'conv_impl_resolved': models.resolve_conv_impl(args.conv_impl),
  }
  log(f'command: {command}')
  log('machine: ' + json.dumps(result['machine']))
  log('versions: ' + json.dumps(result['versions']))
  log('threads: ' + json.dumps(settings))

  peak = measure_matmul_peak(args.matmul_size, args.reps)
  log(f'matmul peak: {peak["gflop_per_s"]:.1f} GFLOP/s ({peak["n"]}^3 float32, '
      f'{peak["ms"]:.1f} ms)')
  peak_gflops = peak['gflop_per_s']

  result['matmul_peak'] = {**peak, 'start_gflop_per_s': peak_gflops}
  rows, programs_of = [], {}
  result['classifiers'] = rows
  for name in args.models:
    programs_of[name] = build_programs(name, args.conv_impl)
    for seeds in args.seeds:
      programs = (build_programs(name, args.conv_impl, seeds) if jax.device_count() > 1
                  else programs_of[name])
      # XLA's cost analysis does not see into custom calls: the same step built with the
      # matmul convolution (the same arithmetic, every FLOP visible) supplies the count.
      counted = None
      if models.resolve_conv_impl(args.conv_impl) == 'onednn':
        counted = build_programs(name, 'matmul', seeds)
      rows.append(bench_classifier(name, programs, seeds, args, peak_gflops,
                                   flop_programs=counted))
      count_all_devices(rows[-1], programs.mesh)
      gc.collect()
      save(result, args.out)
  result['seed_scaling'] = {}
  for name in args.models:
    by_s = {r['seeds']: r['train_images_per_s'] for r in rows
            if r['model'] == name and 'skipped' not in r}
    if 1 in by_s and len(by_s) > 1:
      result['seed_scaling'][name] = by_s[max(by_s)] / by_s[1]

  result['gan'] = {'status': 'skipped', 'reason': '--skip_gan', 'rows': []}
  if args.skip_gan:
    log('GAN section skipped: --skip_gan')
  else:
    result['gan'].update(status='ok', reason=None)
    for kind in args.gan_kinds:
      for seeds in args.gan_seeds:
        result['gan']['rows'].append(bench_gan(kind, seeds, args, peak_gflops))
        gc.collect()
        save(result, args.out)

  peer = {'label': peer_lib.LABEL, 'status': 'skipped', 'reason': None, 'rows': []}
  result['keras_peer'] = peer
  peer_models = [m for m in args.models if m in peer_lib.MODELS]
  if args.skip_keras:
    peer['reason'] = '--skip_keras'
  elif not peer_models:
    peer['reason'] = 'no Keras peer for the chosen models (only cnn and cnn_rnn have one)'
  if peer['reason']:
    log(f'{peer_lib.LABEL}: skipped ({peer["reason"]})')
  else:
    import keras
    result['versions']['keras_backend'] = keras.backend.backend()
    log(f'{peer_lib.LABEL}: Keras {keras.__version__} on {keras.backend.backend()}, threads '
        f'intra {settings["tf_intra_op_threads"]} / inter {settings["tf_inter_op_threads"]} '
        f'(XLA: {settings["xla_intra_op_threads"]})')
    peer['status'] = 'ok'
    for name in peer_models:
      # wbc_jax at S = 1; usually compiled by the classifier section already.
      runner, predict_args = prepare_classifier(programs_of[name], 1, args.batch,
                                                IMAGE_SHAPES[name])
      peer['rows'].append(peer_lib.bench_keras_classifier(
          name, programs_of[name], runner, predict_args, IMAGE_SHAPES[name], args))
      gc.collect()
      save(result, args.out)
    if args.skip_gan or 'paper' not in args.gan_kinds:
      peer['gan_reason'] = '--skip_gan' if args.skip_gan else "--gan_kinds has no 'paper'"
      log(f'peer gan:paper skipped: {peer["gan_reason"]}')
    else:
      config, step = gan_program('paper', args.batch, args.conv_impl)
      state = init_gan(config, 1)
      data = make_batch(1, args.batch, GAN_IMAGE_SHAPE, seed=1)
      runner = TrainRunner(step, state, jax.device_put(data['image'] * 2.0 - 1.0),
                           jax.device_put(data['label']))
      peer['rows'].append(peer_lib.bench_keras_gan(config, runner, gan_params(state), args))

  end_peak = measure_matmul_peak(args.matmul_size, args.reps)
  log(f'matmul peak at the end: {end_peak["gflop_per_s"]:.1f} GFLOP/s')
  # Any slower measurement of the same product is the load, not the hardware.
  faster = max(peak, end_peak, key=lambda p: p['gflop_per_s'])
  best = faster['gflop_per_s']
  result['matmul_peak'] = {**faster, 'start_gflop_per_s': peak['gflop_per_s'],
                           'end_gflop_per_s': end_peak['gflop_per_s']}
  for r in result['classifiers'] + result['gan']['rows']:
    for key in [k for k in r if k.endswith('_fraction_of_peak') and r[k] is not None]:
      r[key] = r[key.replace('_fraction_of_peak', '_gflop_per_s')] / best

  result['machine']['load_average_at_end'] = list(os.getloadavg())
  markdown = save(result, args.out, complete=True)
  print(markdown, flush=True)
  log(f'wrote {os.path.join(args.out, "benchmark.json")} and benchmark.md')
  return result


def save(result: dict[str, Any], out: str, complete: bool = False) -> str | None:
  """Writes benchmark.json (after every measurement, so that a run cut short leaves its
  figures) and, once complete, benchmark.md, whose text it returns."""
  result['complete'] = complete
  result['process_maxrss_mb'] = maxrss_mb()
  result['wall_s'] = elapsed()
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'benchmark.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(path + '.tmp', path)
  if not complete:
    return None
  markdown = benchmark_markdown.to_markdown(result)
  with open(os.path.join(out, 'benchmark.md'), 'w') as f:
    f.write(markdown)
  return markdown


if __name__ == '__main__':
  main()
