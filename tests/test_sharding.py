"""The device mesh: seeds split over 4 emulated CPU devices train exactly as on one.

The emulated devices need XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax
is imported, so those runs are subprocesses; this process keeps its one device and
trains the one-device reference.

Tolerances: see tests/compare_runs.py.
"""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import compare_runs
from compare_runs import RTOL, assert_same_results, emulated_env, run_dir, train_one_run
from wbc_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_RUN = [*compare_runs.ONE_RUN, '--config.num_seeds=4']


@pytest.fixture(scope='module')
def reference(test_config, tmp_path_factory):
  """The tiny ablation, 4 seeds, on this process's single device."""
  assert jax.device_count() == 1, 'the reference run expects one device'
  return train_one_run(test_config, str(tmp_path_factory.mktemp('one_device')), num_seeds=4)


@pytest.fixture(scope='module')
def four_devices(test_config, tmp_path_factory):
  """The same ablation through the entry point on 4 emulated devices, one seed on each."""
  workdir = str(tmp_path_factory.mktemp('four_devices'))
  cmd = [sys.executable, '-m', 'wbc_jax.main', '--config=configs/ablation.py:test',
         f'--workdir={workdir}', f'--config.data.manual_dir={test_config.data.manual_dir}',
         f'--config.data.data_dir={test_config.data.data_dir}', *ONE_RUN]
  proc = subprocess.run(cmd, cwd=ROOT, env=emulated_env(4), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'CpuDevice(id=3)' in proc.stdout
  return workdir


@pytest.mark.slow
def test_four_devices_match_one_device(reference, four_devices):
  assert_same_results(run_dir(four_devices), run_dir(reference))


@pytest.mark.slow
def test_state_is_sharded_and_restored_sharded(four_devices):
  proc = subprocess.run([sys.executable, os.path.join('tests', 'sharding_probe.py'),
                         run_dir(four_devices)], cwd=ROOT, env=emulated_env(4),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('PROBE ')][-1]
  probe = json.loads(line[len('PROBE '):])
  assert probe['device_count'] == 4 and probe['mesh'] == {'seed': 4, 'data': 1}
  one_seed_per_device = {'specs': ["('seed',)"], 'shards_per_leaf': [4],
                         'devices_per_leaf': [4], 'seeds_per_shard': [1]}
  for name in ('restored', 'after_step', 'metrics'):
    got = {k: v for k, v in probe[name].items() if k != 'leaves'}
    assert got == one_seed_per_device, (name, probe[name])
  assert probe['restored']['leaves'] > 10  # params, batch stats, Adam moments, best copies
  assert probe['restored_epoch'] == [2, 2, 2, 2]  # the last checkpoint, in every seed
  assert probe['batch']['specs'] == ["('seed', 'data')"]
  # (seed, data) = (2, 2): two seeds per device pair, each seed's batch of 8 in halves,
  # the state of those two seeds on both devices of the pair.
  assert probe['data_parallel_batch']['seeds_per_shard'] == [2]
  assert probe['data_parallel_image_shard'][:2] == [2, 4]
  assert probe['data_parallel_state']['seeds_per_shard'] == [2]
  assert probe['data_parallel_state']['shards_per_leaf'] == [4]
  assert probe['data_parallel_state']['specs'] == ["('seed',)"]
  np.testing.assert_allclose(probe['losses']['seed2_data2'], probe['losses']['seed4'],
                             rtol=RTOL)
  # Adam's first steps amplify last-bit gradient differences (see compare_runs.py).
  assert probe['params_max_rel_diff'] < 1e-3
  assert probe['predict_shape'] == [4, 5, 4]
  assert probe['predict_max_abs_diff'] < 1e-4
  message = probe['indivisible_error']
  assert 'config.num_seeds=3' in message and 'config.mesh.seed=4' in message
  assert '4 devices' in message


@pytest.mark.parametrize('seed,data,devices,want', [
    (-1, 1, 4, (4, 1)), (-1, 2, 4, (2, 2)), (2, -1, 8, (2, 4)), (1, 1, 1, (1, 1)),
    (4, 1, 4, (4, 1)),
])
def test_mesh_shape_fills_the_remaining_devices(seed, data, devices, want):
  config = types.SimpleNamespace(seed=seed, data=data)
  assert sharding.mesh_shape(config, devices) == want


@pytest.mark.parametrize('seed,data,devices,message', [
    (-1, -1, 4, 'at most one axis'), (3, 1, 4, 'must equal the number of devices'),
    (-1, 3, 4, 'cannot be split'), (0, 1, 4, 'positive'),
])
def test_mesh_shape_errors_name_the_config(seed, data, devices, message):
  with pytest.raises(ValueError, match=message) as e:
    sharding.mesh_shape(types.SimpleNamespace(seed=seed, data=data), devices)
  assert 'config.mesh' in str(e.value) and f'{devices} devices' in str(e.value)


def test_batch_must_split_over_data():
  mesh = types.SimpleNamespace(shape={'seed': 2, 'data': 3}, size=6)
  sharding.check_divisible(4, 9, mesh)
  with pytest.raises(ValueError, match=r'config.train.batch_size=8 .* config.mesh.data=3'):
    sharding.check_divisible(4, 8, mesh)
  with pytest.raises(ValueError, match=r'config.num_seeds=5 .* config.mesh.seed=2 .*6 devices'):
    sharding.check_divisible(5, 9, mesh)


def test_cluster_detection():
  assert sharding.detect_cluster({}) is None
  assert sharding.detect_cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert sharding.detect_cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == 'slurm'
  assert sharding.detect_cluster({'TPU_WORKER_HOSTNAMES': 'a,b'}) == 'tpu'
  assert sharding.detect_cluster({'TPU_WORKER_HOSTNAMES': 'a'}) is None
  with pytest.raises(ValueError, match='go together'):
    sharding.initialize_distributed('127.0.0.1:1234', None, 0)
