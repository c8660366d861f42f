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
3. GAN steps (`wbc_jax.gan.train.gan_train_step`, both kinds, vmapped over S), if that module
   exposes the functions it needs; otherwise the section is skipped with the reason;
4. a peer, Keras 3 on TensorFlow, which is not part of wbc_jax: the paper's CNN and CNN-RNN
   (and its DCGAN step) written in Keras with the same layers (`wbc_jax.keras_twins`),
   trained with what `model.fit` runs by default, timed alternately with wbc_jax at S = 1
   (A B A B ...) so that a changing machine load hits both sides alike.

Images/s counts every image a step processes: S * batch for the train step (each seed trains
on its own batch) and S * batch predictions for predict (all seeds predict the same batch).

Results go to `<out>/benchmark.json` and `<out>/benchmark.md`, with the machine, the date,
the versions, the thread settings and the exact command line.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Compile times are measured here: a persistent compilation cache (the test suite sets one
# through JAX_COMPILATION_CACHE_DIR) would time a disk read instead of XLA.
jax.config.update('jax_enable_compilation_cache', False)
import ml_collections
import numpy as np

# Read when TensorFlow and Keras are first imported, which happens later (wbc_jax imports
# TensorFlow for its input pipeline; nothing above does).
os.environ['KERAS_BACKEND'] = 'tensorflow'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, 'experiments', 'benchmarks')

NUM_CLASSES = 4
# The frame view (the paper's input) for the paper's models and the GANs; the crop view for
# the residual net.
IMAGE_SHAPES = {'cnn': (60, 80, 3), 'cnn_rnn': (60, 80, 3), 'resnet': (64, 64, 3),
                'cellnet': (64, 64, 3)}
GAN_IMAGE_SHAPE = (60, 80, 3)
GAN_KINDS = ('paper', 'cond')
PEER_MODELS = ('cnn', 'cnn_rnn')
PEER_LABEL = 'peer: Keras on TensorFlow, not part of wbc_jax'
# The paper-era Keras count of the CNN-RNN: its cuDNN LSTMs keep a second bias per gate.
PAPER_KERAS_CNN_RNN_PARAMS = 8_926_788

_T0 = time.perf_counter()


def log(message: str) -> None:
  """One line of progress, stamped with the seconds since the start."""
  print(f'[{time.perf_counter() - _T0:7.1f}s] {message}', flush=True)


# ------------------------------------------------------------------------------------------
# Command line, machine, settings
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
                      'train step over them (see sharded_programs); 0: the real devices')
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


def machine_info() -> dict[str, Any]:
  cpu_model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu_model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  device = jax.devices()[0]
  return {
      'cpu_model': cpu_model,
      'cpu_count': os.cpu_count(),
      'usable_cores': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                      else os.cpu_count(),
      'memory_gb': round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1),
      'platform': platform.platform(),
      'jax_backend': jax.default_backend(),
      'jax_device_kind': device.device_kind,
      'jax_device_count': jax.device_count(),
      'load_average_at_start': list(os.getloadavg()),
  }


def versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for dist in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'tensorflow-cpu', 'tensorflow',
               'keras', 'wbc_jax'):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def thread_settings() -> dict[str, Any]:
  """Sizes TensorFlow's thread pools like XLA's and returns what each side uses.

  XLA:CPU runs each program on one intra-op pool with a thread per usable core, and runs
  independent operations of a program concurrently on it. TensorFlow's intra-op pool is set to
  the same size, and its inter-op pool (independent operations) too, which are also
  TensorFlow's defaults; the settings only make them explicit. Both runtimes live in this
  process and share the same cores; they never run at the same time.
  """
  import tensorflow as tf  # already imported by wbc_jax's input pipeline

  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  applied = True
  try:
    tf.config.threading.set_intra_op_parallelism_threads(cores)
    tf.config.threading.set_inter_op_parallelism_threads(cores)
  except RuntimeError:  # TensorFlow's runtime was started before this call
    applied = False
  return {
      'cores': cores,
      'xla_intra_op_threads': cores,
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
      'tf_intra_op_threads': tf.config.threading.get_intra_op_parallelism_threads(),
      'tf_inter_op_threads': tf.config.threading.get_inter_op_parallelism_threads(),
      'tf_thread_settings_applied': applied,
      'TF_ENABLE_ONEDNN_OPTS': os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(unset: on)'),
      'KERAS_BACKEND': os.environ['KERAS_BACKEND'],
      'note': 'TensorFlow and JAX share these cores in one process; TF thread pools are '
              'sized like XLA:CPU\'s (one thread per usable core); they never run at once.',
  }


# ------------------------------------------------------------------------------------------
# Timing and compiled-program statistics
# ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
  """Seconds of one call of `fn`, which must block until its results are ready."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def median_time(fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
  times = [timed(fn) for _ in range(reps)]
  return statistics.median(times), times


def compile_program(jitted, *args) -> tuple[float, Any]:
  """(seconds to trace, lower and compile `jitted` for `args`, the compiled program).

  JAX caches the compiled program, so the first call of `jitted` afterwards only runs it.
  """
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return time.perf_counter() - start, compiled


def program_stats(compiled) -> dict[str, Any]:
  """FLOPs and memory of a compiled program, from XLA.

  XLA counts the body of a loop once, whatever its trip count: for the CNN-RNN's LSTMs the
  FLOPs are a lower bound (the convolutions and dense layers dominate them). Custom calls
  (conv_impl 'onednn') are not counted at all: `bench_classifier` counts those programs'
  FLOPs on their matmul twin.
  """
  flops = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    if cost and cost.get('flops', -1) > 0:
      flops = float(cost['flops'])
  except Exception as e:  # noqa: BLE001  some backends do not implement it
    log(f'  cost analysis unavailable: {e}')
  memory = None
  try:
    m = compiled.memory_analysis()
    if m is not None:
      memory = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in
                ('argument', 'output', 'alias', 'temp', 'generated_code')}
      # Donated inputs alias outputs: count that memory once.
      memory['total'] = memory['argument'] + memory['output'] - memory['alias'] + memory['temp']
  except Exception as e:  # noqa: BLE001
    log(f'  memory analysis unavailable: {e}')
  return {'flops': flops, 'memory_bytes': memory}


def available_memory_bytes() -> int | None:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def memory_shortfall(stats: dict[str, Any], headroom: float = 0.9) -> str | None:
  """Why running a compiled program could exhaust host memory, or None if it fits.

  Its arguments are already allocated; it needs its temporaries and its new outputs on top.
  On a host backend that memory is the machine's, shared with everything else running.
  """
  memory, available = stats['memory_bytes'], available_memory_bytes()
  if jax.default_backend() != 'cpu' or memory is None or available is None:
    return None
  needed = memory['temp'] + memory['output'] - memory['alias']
  if needed <= headroom * available:
    return None
  return (f'needs {needed / 2**30:.1f} GiB more host memory, {available / 2**30:.1f} GiB '
          'available')


def maxrss_mb() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rate_fields(prefix: str, seconds: float, images: int, flops: float | None,
                peak_gflops: float) -> dict[str, Any]:
  gflops = flops / seconds / 1e9 if flops else None
  return {
      f'{prefix}_ms': seconds * 1e3,
      f'{prefix}_images_per_s': images / seconds,
      f'{prefix}_gflop_per_step': flops / 1e9 if flops else None,
      f'{prefix}_gflop_per_s': gflops,
      f'{prefix}_fraction_of_peak': gflops / peak_gflops if gflops else None,
  }


def measure_matmul_peak(n: int, reps: int) -> dict[str, Any]:
  """Median GFLOP/s of a jitted float32 [n, n] @ [n, n]."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  seconds, times = median_time(lambda: matmul(a, b).block_until_ready(), max(reps, 3))
  flops = 2.0 * n**3
  return {'n': n, 'dtype': 'float32', 'ms': seconds * 1e3, 'gflop_per_s': flops / seconds / 1e9,
          'reps': len(times)}


# ------------------------------------------------------------------------------------------
# wbc_jax classifiers
# ------------------------------------------------------------------------------------------


def make_batch(seeds: int, batch: int, image_shape, seed: int = 0) -> dict[str, np.ndarray]:
  """Random images in [0, 1] and labels: {'image': [S, B, H, W, 3], 'label': [S, B]}."""
  rng = np.random.default_rng(seed)
  return {'image': rng.random((seeds, batch, *image_shape), dtype=np.float32),
          'label': rng.integers(0, NUM_CLASSES, (seeds, batch)).astype(np.int32)}


class TrainRunner:
  """Runs a donated train step in place: `state` always holds the newest state."""

  def __init__(self, step, state, batch, class_weights):
    self.step, self.state = step, state
    self.batch, self.class_weights = batch, class_weights

  def __call__(self, steps: int = 1) -> None:
    if steps < 1:
      return
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch, self.class_weights)
    jax.block_until_ready((self.state, metrics))


def build_programs(name: str, conv_impl: str):
  from wbc_jax import models, train

  model = models.get_model(name, num_classes=NUM_CLASSES, conv_impl=conv_impl)
  tx = train.make_optimizer(ml_collections.ConfigDict(
      {'optimizer': 'adam', 'learning_rate': 1e-3, 'weight_decay': 0.0}))
  return train.make_programs(model, tx, IMAGE_SHAPES[name], options=step_options(name))


def step_options(name: str):
  """The train step's options: the strong baseline's for cellnet (configs/baseline.py:
  augmentation inside the step, EMA, TTA is an evaluation matter), none for the others."""
  from wbc_jax import train

  if name != 'cellnet':
    return train.StepOptions()
  sys.path.insert(0, ROOT)
  from configs import baseline
  return train.StepOptions.from_config(baseline.get_config('quick'), augment=True)


def emulate_cpu_devices(n: int) -> None:
  """Makes the CPU backend show `n` devices; before anything has started it.

  The emulated devices share this machine's cores: more devices only split the same
  compute, so their figures show the cost of sharding, not a speed-up.
  """
  jax.config.update('jax_num_cpu_devices', n)
  if jax.device_count() != n:
    raise SystemExit(f'--devices={n}: the backend shows {jax.device_count()} devices '
                     '(it was started before the flag could apply, or is not the CPU)')


def sharded_programs(name: str, conv_impl: str, seeds: int):
  """`build_programs` with the S seeds split over the devices along the mesh's seed axis.

  The mesh takes the largest number of devices that divides S (S = 4 on 4 devices: one
  seed per device; S = 1: one device), as `wbc_jax.sharding.check_divisible` requires.
  """
  from wbc_jax import models, sharding, train

  devices = jax.devices()[:math.gcd(seeds, jax.device_count())]
  model = models.get_model(name, num_classes=NUM_CLASSES, conv_impl=conv_impl)
  tx = train.make_optimizer(ml_collections.ConfigDict(
      {'optimizer': 'adam', 'learning_rate': 1e-3, 'weight_decay': 0.0}))
  return train.make_programs(model, tx, IMAGE_SHAPES[name], sharding.make_mesh(None, devices))


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
    return runner.state.params, runner.state.batch_stats, images, runner.state.input_norm

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
      f'program memory {_mb((train_stats["memory_bytes"] or {}).get("total"))} MB')
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
      f'{row["train_images_per_s"]:8.1f} img/s  ' + _flops_text(row, 'train'))

  for _ in range(args.warmup):
    predict()
  predict_s, predict_times = median_time(predict, args.reps)
  row.update(rate_fields('predict', predict_s, images, predict_stats['flops'], peak))
  log(f'{tag}  predict {predict_s * 1e3:9.1f} ms/step  '
      f'{row["predict_images_per_s"]:8.1f} img/s  ' + _flops_text(row, 'predict'))

  row.update(train_times_ms=[t * 1e3 for t in train_times],
             predict_times_ms=[t * 1e3 for t in predict_times],
             train_memory_bytes=train_stats['memory_bytes'],
             predict_memory_bytes=predict_stats['memory_bytes'],
             process_maxrss_mb=maxrss_mb())
  log(f'{tag}  process peak RSS so far {row["process_maxrss_mb"]:.0f} MB')
  return row


def _flops_text(row: dict, prefix: str) -> str:
  if row[f'{prefix}_gflop_per_s'] is None:
    return '(no FLOP count)'
  return (f'{row[f"{prefix}_gflop_per_step"]:8.2f} GFLOP/step  '
          f'{row[f"{prefix}_gflop_per_s"]:7.1f} GFLOP/s  '
          f'{100 * row[f"{prefix}_fraction_of_peak"]:5.1f}% of peak')


def _mb(nbytes: int | None) -> str:
  return 'n/a' if nbytes is None else f'{nbytes / 2**20:.0f}'


# ------------------------------------------------------------------------------------------
# wbc_jax GANs
# ------------------------------------------------------------------------------------------


def gan_api() -> tuple[Any, str | None]:
  """wbc_jax.gan.train if it has what the GAN benchmark calls, else (None, the reason)."""
  try:
    from wbc_jax.gan import train as gan_train
  except Exception as e:  # noqa: BLE001  any import failure means "not available"
    return None, f'wbc_jax.gan.train cannot be imported ({type(e).__name__}: {e})'
  missing = [f for f in ('default_gan_config', 'init_gan_state', 'gan_train_step')
             if not hasattr(gan_train, f)]
  if missing:
    return None, f'wbc_jax.gan.train does not define {", ".join(missing)}'
  return gan_train, None


def gan_config(gan_train, kind: str, batch: int, conv_impl: str = 'auto'):
  config = gan_train.default_gan_config(kind)
  config.batch_size = batch
  if 'conv_impl' in config:
    config.conv_impl = conv_impl
  return config


def make_gan_step(gan_train, config):
  """jit(vmap(gan_train_step)) over a leading member axis, state donated."""
  import inspect

  kwargs = {'config': config}
  if 'num_classes' in inspect.signature(gan_train.gan_train_step).parameters:
    kwargs['num_classes'] = NUM_CLASSES
  return jax.jit(jax.vmap(functools.partial(gan_train.gan_train_step, **kwargs)),
                 donate_argnums=0)


def init_gan(gan_train, config, seeds: int):
  height, width, _ = GAN_IMAGE_SHAPE
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds, dtype=jnp.uint32))
  if hasattr(gan_train, 'init_gan_states'):  # one compiled single-GAN init per member
    return gan_train.init_gan_states(keys, config, height=height, width=width,
                                     num_classes=NUM_CLASSES)
  init = functools.partial(gan_train.init_gan_state, config, height=height, width=width,
                           num_classes=NUM_CLASSES)
  return jax.jit(jax.vmap(init))(keys)


def gan_params(state) -> int:
  from wbc_jax import models
  return models.count_params(state.g_params) + models.count_params(state.d_params)


@functools.cache
def gan_program(gan_train, kind: str, batch: int, conv_impl: str = 'auto'):
  """(config, jitted step) of one GAN kind, made once so that its compilations are reused."""
  config = gan_config(gan_train, kind, batch, conv_impl)
  return config, make_gan_step(gan_train, config)


def bench_gan(gan_train, kind: str, seeds: int, args, peak: float) -> dict[str, Any]:
  config, step = gan_program(gan_train, kind, args.batch, args.conv_impl)
  state = init_gan(gan_train, config, seeds)
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
      f'{_mb((stats["memory_bytes"] or {}).get("total"))} MB')
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
      f'{row["step_images_per_s"]:8.1f} real img/s  ' + _flops_text(row, 'step'))
  return row


# ------------------------------------------------------------------------------------------
# Peer: Keras on TensorFlow (not part of wbc_jax)
# ------------------------------------------------------------------------------------------
# The Keras models are wbc_jax.keras_twins, which tests/test_keras_equivalence.py checks
# against the Flax models with the same weights.


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


def bench_keras_classifier(name: str, programs, args) -> dict[str, Any]:
  import keras
  from wbc_jax import keras_twins
  from wbc_jax import models

  keras.utils.set_random_seed(0)
  image_shape = IMAGE_SHAPES[name]
  runner, predict_args = prepare_classifier(programs, 1, args.batch, image_shape)
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
  del model
  return row


def bench_keras_gan(gan_train, args) -> dict[str, Any]:
  import keras
  from wbc_jax import keras_twins

  keras.utils.set_random_seed(0)
  height, width, _ = GAN_IMAGE_SHAPE
  config, step = gan_program(gan_train, 'paper', args.batch, args.conv_impl)
  state = init_gan(gan_train, config, 1)
  wbc_params = gan_params(state)
  data = make_batch(1, args.batch, GAN_IMAGE_SHAPE, seed=1)
  real = jax.device_put(data['image'] * 2.0 - 1.0)
  runner = TrainRunner(step, state, real, jax.device_put(data['label']))
  gan = keras_twins.paper_gan(height, width, config.latent_dim, config.lr_d, config.b1, config.b2)
  x = np.asarray(real[0])
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


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _fmt(value, spec: str = '.1f') -> str:
  if value is None:
    return 'n/a'
  return format(value, spec)


def _pct(value) -> str:
  return 'n/a' if value is None else f'{100 * value:.1f}%'


def to_markdown(result: dict[str, Any]) -> str:
  m, s, peak = result['machine'], result['settings'], result['matmul_peak']
  lines = [
      '# wbc_jax benchmark',
      '',
      f'- Date: {result["date"]}',
      f'- Command: `{result["command"]}`',
      f'- Machine: {m["cpu_model"]}, {m["usable_cores"]} usable cores, {m["memory_gb"]} GB; '
      f'JAX backend `{m["jax_backend"]}` ({m["jax_device_kind"]}); load average '
      f'{" / ".join(f"{x:.2f}" for x in m["load_average_at_start"])} at the start, '
      f'{" / ".join(f"{x:.2f}" for x in m["load_average_at_end"])} at the end',
      '- Versions: ' + ', '.join(f'{k} {v}' for k, v in result['versions'].items()),
      f'- Threads: XLA {s["xla_intra_op_threads"]} intra-op; TensorFlow '
      f'{s["tf_intra_op_threads"]} intra-op / {s["tf_inter_op_threads"]} inter-op '
      f'(applied: {s["tf_thread_settings_applied"]}); XLA_FLAGS=`{s["XLA_FLAGS"]}`. '
      f'{s["note"]}',
      f'- Matmul peak (float32 {peak["n"]}x{peak["n"]} @ {peak["n"]}x{peak["n"]}, jitted, '
      f'median): **{peak["gflop_per_s"]:.1f} GFLOP/s** (start {peak["start_gflop_per_s"]:.1f}, '
      f'end {_fmt(peak.get("end_gflop_per_s"))}; the larger is the reference)',
      f'- Reps: {result["args"]["reps"]} timed steps per figure (medians; '
      f'{result["args"]["gan_reps"]} for GAN steps), '
      f'{result["args"]["warmup"]} warm-up step(s); conv_impl `{result["args"]["conv_impl"]}` '
      f'(resolved: `{result["conv_impl_resolved"]}`)',
      '',
      '## wbc_jax classifiers',
      '',
      'Images/s = S x batch / step time. GFLOP/step from XLA\'s cost analysis of the compiled '
      'program (loop bodies counted once, so a lower bound for the CNN-RNN). "Compile" is trace '
      '+ lower + compile; "first call" is the first run of the compiled program. Memory: the '
      'compiled train program\'s arguments + outputs + temporaries (donated state counted once).'
      + (' With conv_impl `onednn` the convolutions are custom calls, which XLA\'s cost '
         'analysis does not count: GFLOP and % of peak then leave them out.'
         if result['conv_impl_resolved'] == 'onednn' else ''),
      '',
      '| model | S | batch | params/seed | compile train (s) | first call train (s) '
      '| compile predict (s) | train ms/step | train img/s | train GFLOP/step | train GFLOP/s '
      '| train % peak | predict ms | predict img/s | predict GFLOP/s | predict % peak '
      '| train program MB |',
      '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
  ]
  for r in result['classifiers']:
    mem = r['train_memory_bytes']
    head = f'| {r["model"]} | {r["seeds"]} | {r["batch"]} | {r["params_per_seed"]:,} '
    if 'skipped' in r:
      lines.append(head + f'| skipped: {r["skipped"]} |' + ' |' * 12
                   + f' {_mb(mem["total"] if mem else None)} |')
      continue
    lines.append(
        head + f'| {r["compile_train_s"]:.1f} | {r["first_call_train_s"]:.1f} '
        f'| {r["compile_predict_s"]:.1f} '
        f'| {r["train_ms"]:.1f} | {r["train_images_per_s"]:.1f} '
        f'| {_fmt(r["train_gflop_per_step"], ".2f")} | {_fmt(r["train_gflop_per_s"])} '
        f'| {_pct(r["train_fraction_of_peak"])} | {r["predict_ms"]:.1f} '
        f'| {r["predict_images_per_s"]:.1f} | {_fmt(r["predict_gflop_per_s"])} '
        f'| {_pct(r["predict_fraction_of_peak"])} | {_mb(mem["total"] if mem else None)} |')
  scaling = result.get('seed_scaling', {})
  if scaling:
    lines += ['', 'Seed scaling (train images/s at the largest S / at S = 1): '
              + ', '.join(f'{k} {v:.2f}x' for k, v in scaling.items())]

  gan = result['gan']
  lines += ['', '## wbc_jax GANs', '']
  if gan['status'] != 'ok':
    lines.append(f'Skipped: {gan["reason"]}')
  else:
    lines += [
        'One step = one Adam step of D (real + generated batch) then one of G, vmapped over S '
        'GANs; img/s counts real images.',
        '',
        '| kind | S | batch | params/GAN (G + D) | compile (s) | first call (s) | ms/step '
        '| real img/s | GFLOP/step | GFLOP/s | % peak | program MB |',
        '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
    ]
    for r in gan['rows']:
      mem = r['memory_bytes']
      head = f'| {r["kind"]} | {r["seeds"]} | {r["batch"]} | {r["params_per_seed"]:,} '
      if 'skipped' in r:
        lines.append(head + f'| skipped: {r["skipped"]} |' + ' |' * 6
                     + f' {_mb(mem["total"] if mem else None)} |')
        continue
      lines.append(
          head + f'| {r["compile_s"]:.1f} | {r["first_call_s"]:.1f} | {r["step_ms"]:.1f} '
          f'| {r["step_images_per_s"]:.1f} '
          f'| {_fmt(r["step_gflop_per_step"], ".2f")} | {_fmt(r["step_gflop_per_s"])} '
          f'| {_pct(r["step_fraction_of_peak"])} | {_mb(mem["total"] if mem else None)} |')

  peer = result['keras_peer']
  lines += ['', f'## {peer["label"]}', '']
  if peer['status'] != 'ok':
    lines.append(f'Skipped: {peer["reason"]}')
  else:
    lines += [
        'Same layers, batch and inputs; Keras trains with `train_on_batch` (the train function '
        '`model.fit` runs; `jit_compile` as Keras resolves its default) and predicts with '
        '`predict_on_batch`. wbc_jax at S = 1 and Keras are timed alternately, '
        f'{peer["rows"][0]["pairs"] if peer["rows"] else 0} pairs; ratio = wbc_jax img/s / '
        'Keras img/s, median over pairs.',
        '',
        '| model | Keras params | wbc_jax params | Keras jit_compile | Keras first step (s) '
        '| train: wbc_jax img/s | train: Keras img/s | train ratio '
        '| predict: wbc_jax img/s | predict: Keras img/s | predict ratio |',
        '|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|',
    ]
    for r in peer['rows']:
      lines.append(
          f'| {r["model"]} | {r["keras_params"]:,} | {r["wbc_jax_params"]:,} '
          f'| {r["keras_jit_compile"]} | {r["keras_first_train_step_s"]:.1f} '
          f'| {r["train_wbc_jax_images_per_s"]:.1f} | {r["train_keras_images_per_s"]:.1f} '
          f'| **{r["train_ratio_median"]:.2f}x** '
          f'| {_fmt(r.get("predict_wbc_jax_images_per_s"))} '
          f'| {_fmt(r.get("predict_keras_images_per_s"))} '
          f'| {_fmt(r.get("predict_ratio_median"), ".2f")}{"x" if "predict_ratio_median" in r else ""} |')
    if any(r['model'] == 'cnn_rnn' for r in peer['rows']):
      lines += ['', f'The paper-era Keras count of the CNN-RNN, with cuDNN LSTMs (two biases per '
                f'gate), is {PAPER_KERAS_CNN_RNN_PARAMS:,}; Keras 3\'s LSTM keeps one bias.']
    if peer.get('gan_reason'):
      lines += ['', f'Keras paper-GAN step skipped: {peer["gan_reason"]}']
  lines += ['', f'Process peak RSS: {result["process_maxrss_mb"]:.0f} MB. '
            f'Total wall time: {result["wall_s"]:.0f} s.', '']
  return '\n'.join(lines)


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
  from wbc_jax import models as models_lib
  rows, programs_of = [], {}
  result['classifiers'] = rows
  for name in args.models:
    programs_of[name] = build_programs(name, args.conv_impl)
    for seeds in args.seeds:
      programs = (sharded_programs(name, args.conv_impl, seeds) if jax.device_count() > 1
                  else programs_of[name])
      # XLA's cost analysis does not see into custom calls: the same step built with the
      # matmul convolution (the same arithmetic, every FLOP visible) supplies the count.
      counted = None
      if models_lib.resolve_conv_impl(args.conv_impl) == 'onednn':
        counted = (sharded_programs(name, 'matmul', seeds) if jax.device_count() > 1
                   else build_programs(name, 'matmul'))
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

  gan_train, gan_reason = gan_api()
  if args.skip_gan:
    gan_train, gan_reason = None, '--skip_gan'
  result['gan'] = {'status': 'skipped', 'reason': gan_reason, 'rows': []}
  if gan_train is None:
    log(f'GAN section skipped: {gan_reason}')
  else:
    result['gan']['status'] = 'ok'
    for kind in args.gan_kinds:
      for seeds in args.gan_seeds:
        result['gan']['rows'].append(bench_gan(gan_train, kind, seeds, args, peak_gflops))
        gc.collect()
        save(result, args.out)

  peer = {'label': PEER_LABEL, 'status': 'skipped', 'reason': None, 'rows': []}
  result['keras_peer'] = peer
  peer_models = [m for m in args.models if m in PEER_MODELS]
  if args.skip_keras:
    peer['reason'] = '--skip_keras'
  elif not peer_models:
    peer['reason'] = 'no Keras peer for the chosen models (only cnn and cnn_rnn have one)'
  if peer['reason']:
    log(f'{PEER_LABEL}: skipped ({peer["reason"]})')
  else:
    import keras
    result['versions']['keras_backend'] = keras.backend.backend()
    log(f'{PEER_LABEL}: Keras {keras.__version__} on {keras.backend.backend()}, threads '
        f'intra {settings["tf_intra_op_threads"]} / inter {settings["tf_inter_op_threads"]} '
        f'(XLA: {settings["xla_intra_op_threads"]})')
    peer['status'] = 'ok'
    for name in peer_models:
      peer['rows'].append(bench_keras_classifier(name, programs_of[name], args))
      gc.collect()
      save(result, args.out)
    if gan_train is None or 'paper' not in args.gan_kinds:
      peer['gan_reason'] = gan_reason or "--gan_kinds has no 'paper'"
      log(f'peer gan:paper skipped: {peer["gan_reason"]}')
    else:
      peer['rows'].append(bench_keras_gan(gan_train, args))

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
  result['wall_s'] = time.perf_counter() - _T0
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'benchmark.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(path + '.tmp', path)
  if not complete:
    return None
  markdown = to_markdown(result)
  with open(os.path.join(out, 'benchmark.md'), 'w') as f:
    f.write(markdown)
  return markdown


if __name__ == '__main__':
  main()
