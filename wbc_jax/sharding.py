"""Devices, processes, the mesh, and where the seed-vmapped arrays live.

The mesh has two axes, set by `config.mesh`:
  seed  the vmapped seed axis: each slice of the mesh along `seed` trains
        num_seeds / mesh.seed of the seeds (the state of a seed lives on one slice);
  data  each seed's batch is split along `data` (data parallelism within a seed);
        the state is replicated along it and XLA sums the gradients across it.
A size of -1 takes the devices the other axis leaves; the product of the two sizes
must be the number of devices. num_seeds must be a multiple of the `seed` size and
train.batch_size one of the `data` size (`check_divisible`): the seeds are not
padded with dummy seeds, which would cost a full seed's compute and change nothing
else, so a count that does not divide is an error naming the fields to change.

Shardings (leading seed axis S, batch B):
  train state, every leaf [S, ...]       P('seed')          replicated along data
  train batch  image [S, B, H, W, 3],
               label [S, B]              P('seed', 'data')
  per-seed outputs, metrics [S], [S, N, C]  P('seed')
  eval images [B, H, W, 3], class weights replicated (P()); the predict program
               splits the eval batch along `data` itself.

Several processes (`initialize_distributed`): every process runs the same program
on its own devices; arrays are global (`put` builds them from the numpy value
that every process computes, each process filling only the shards it holds), and
`to_host` brings a global array back whole to every process, so every process ends
with the same metrics. Only process 0 writes files (`is_primary`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

SEED, DATA = 'seed', 'data'
AXES = (SEED, DATA)


# ----------------------------------------------------------------------------- processes


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """'slurm' or 'tpu' when this process is one of several that JAX can find by itself.

  Slurm: a job step with more than one task (`srun`; jax reads the task's rank and the
  first node of the step). A Slurm job with one task stays single-process and uses all
  the devices of its node. TPU: a multi-host slice announces its workers in the
  environment (GKE, multislice); a Cloud TPU VM (libtpu installed and TPU chips
  present) asks its metadata server, which jax does.
  """
  env = os.environ if env is None else env
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'slurm'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', '') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  if env is os.environ and importlib.util.find_spec('libtpu') is not None and (
      glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
    return 'tpu'
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> str | None:
  """Joins a multi-process run with `jax.distributed.initialize`, before any computation.

  With all three arguments, joins that run (any platform, CPU included). With none,
  joins only when `detect_cluster` finds one, letting jax read the rest from the
  environment; otherwise stays a single process. Returns how it joined ('flags',
  'slurm', 'tpu') or None.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together: '
                     'give all three, or none to detect a Slurm or TPU cluster.')
  how = 'flags' if all(given) else detect_cluster()
  if how is None:
    return None
  # CPU processes exchange data through Gloo over TCP (the default of this jax version,
  # set here so that a version with another default still works); it is read when the
  # CPU backend is created, so it must precede initialize. GPUs and TPUs ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if how == 'flags':
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return how


def is_primary() -> bool:
  """True in the one process that writes files (process 0)."""
  return jax.process_index() == 0


def process_count() -> int:
  return jax.process_count()


# ----------------------------------------------------------------------------- mesh


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(seed, data) axis sizes from `config.mesh` on `num_devices` devices; -1 = the rest."""
  sizes = {axis: int(getattr(mesh_config, axis)) for axis in AXES}
  where = f'config.mesh (seed={sizes[SEED]}, data={sizes[DATA]}) on {num_devices} devices'
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'{where}: at most one axis may be -1.')
  if any(size < 1 and size != -1 for size in sizes.values()):
    raise ValueError(f'{where}: axis sizes are positive, or -1 for the remaining devices.')
  if free:
    fixed = sizes[DATA if free[0] == SEED else SEED]
    if num_devices % fixed:
      raise ValueError(f'{where}: {num_devices} devices cannot be split into groups of {fixed}.')
    sizes[free[0]] = num_devices // fixed
  if sizes[SEED] * sizes[DATA] != num_devices:
    raise ValueError(f'{where}: seed x data = {sizes[SEED] * sizes[DATA]} must equal the '
                     f'number of devices ({num_devices}); use -1 for one axis.')
  return sizes[SEED], sizes[DATA]


def make_mesh(mesh_config=None, devices=None) -> Mesh:
  """The ('seed', 'data') mesh over all devices (of every process), or over `devices`.

  mesh_config: `config.mesh` (fields seed, data); None: every device on the seed axis.
  Devices are ordered by process, so that the `data` axis (the one with collectives)
  stays within a host where the sizes allow it.
  """
  devices = list(jax.devices() if devices is None else devices)
  if mesh_config is None:
    shape = (len(devices), 1)
  else:
    shape = mesh_shape(mesh_config, len(devices))
  devices.sort(key=lambda d: (d.process_index, d.id))
  grid = mesh_utils.create_device_mesh(shape, devices)
  # Auto axes: XLA propagates the shardings declared at the programs' edges through the
  # one-seed code that vmap batched, which says nothing about devices.
  return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def single_device_mesh() -> Mesh:
  """A 1 x 1 mesh on the first device: the layout of a plain `jax.jit`."""
  return make_mesh(None, jax.devices()[:1])


def check_divisible(num_seeds: int, batch_size: int, mesh: Mesh) -> None:
  """Fails, naming the config fields, when the seeds or the batch do not split evenly."""
  seed, data = mesh.shape[SEED], mesh.shape[DATA]
  if num_seeds % seed:
    raise ValueError(
        f'config.num_seeds={num_seeds} is not a multiple of config.mesh.seed={seed} '
        f'(the seed axis of the mesh over {mesh.size} devices): each device group along '
        'the seed axis trains the same number of seeds. Choose num_seeds as a multiple of '
        f'{seed}, or set config.mesh.seed to a divisor of {num_seeds} (and config.mesh.data '
        'to -1 or to the devices left).')
  if batch_size % data:
    raise ValueError(
        f'config.train.batch_size={batch_size} is not a multiple of config.mesh.data={data} '
        f'(the data axis of the mesh over {mesh.size} devices): each seed\'s batch is split '
        'evenly along the data axis.')


def seed_sharding(mesh: Mesh) -> NamedSharding:
  """Leading seed axis split over 'seed', the rest replicated: state leaves, metrics."""
  return NamedSharding(mesh, P(SEED))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[S, B, ...] split over ('seed', 'data'): training batches."""
  return NamedSharding(mesh, P(SEED, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """[B, ...] split over 'data': an evaluation batch shared by all seeds."""
  return NamedSharding(mesh, P(DATA))


def abstract_like(tree: Any, sharding: NamedSharding) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves, placed with `sharding` (Orbax restore targets)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# ----------------------------------------------------------------------------- host <-> device


def put(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from the numpy value `x` that every process holds in full.

  Each process copies only the shards of its own devices, so this is `device_put` on
  one process and needs no communication on several.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def local_seed_rows(sharding: jax.sharding.Sharding, num_seeds: int) -> np.ndarray:
  """The seeds (indices along the leading axis) whose shards this process holds, sorted.

  A process builds the inputs of these seeds only: on one process, all of them.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((num_seeds,)).values():
    rows.update(range(num_seeds)[index[0]])
  return np.asarray(sorted(rows), np.int64)


def put_seed_rows(local: np.ndarray, rows: np.ndarray, sharding: jax.sharding.Sharding,
                  num_seeds: int) -> jax.Array:
  """A global [S, ...] array from this process's seeds: local[i] is seed rows[i].

  rows: `local_seed_rows(sharding, S)`, the rows that this process's shards cover.
  """
  local = np.asarray(local)
  shape = (num_seeds, *local.shape[1:])

  def shard(index):
    position = np.searchsorted(rows, np.arange(num_seeds)[index[0]])
    return local[position][(slice(None), *index[1:])]

  return jax.make_array_from_callback(shape, sharding, shard)


def to_host(tree: Any) -> Any:
  """numpy copies of a pytree of arrays, whole in every process.

  A global array that spans other processes is all-gathered (a collective: every
  process must call this at the same point of the program).
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)
