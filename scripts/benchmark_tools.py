"""The benchmark's measuring tools: the machine and its thread settings, timing, and the
FLOPs and memory of compiled programs (scripts/benchmark.py, scripts/benchmark_keras.py,
scripts/profile_step.py).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from wbc_jax import utils

NUM_CLASSES = 4

_T0 = time.perf_counter()


def elapsed() -> float:
  """Seconds since this module was imported (the benchmark's start)."""
  return time.perf_counter() - _T0


def log(message: str) -> None:
  """One line of progress, stamped with the seconds since the start."""
  print(f'[{time.perf_counter() - _T0:7.1f}s] {message}', flush=True)


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask, where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count()


def machine_info() -> dict[str, Any]:
  device = jax.devices()[0]
  return {
      'cpu_model': utils.cpu_model(),
      'cpu_count': os.cpu_count(),
      'usable_cores': usable_cores(),
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

  cores = usable_cores()
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


def flops_text(row: dict, prefix: str) -> str:
  if row[f'{prefix}_gflop_per_s'] is None:
    return '(no FLOP count)'
  return (f'{row[f"{prefix}_gflop_per_step"]:8.2f} GFLOP/step  '
          f'{row[f"{prefix}_gflop_per_s"]:7.1f} GFLOP/s  '
          f'{100 * row[f"{prefix}_fraction_of_peak"]:5.1f}% of peak')


def mb(nbytes: int | None) -> str:
  return 'n/a' if nbytes is None else f'{nbytes / 2**20:.0f}'
