"""Helpers of the multi-device tests: emulated CPU devices, and two runs compared.

Tolerances: accuracies, selected epochs and confusion matrices are equal; losses (NLL)
and probabilities agree to 1e-4 relative / 1e-5 absolute. A program split over devices
sees fewer seeds (or rows) at once, so XLA may fuse and order float sums differently,
and Adam's first steps divide by |gradient|, which turns last-bit differences into
larger ones; on the :test config they stay below 5e-6 relative.
"""

import json
import os

import numpy as np

from wbc_jax import ablation
from wbc_jax import rundir

RTOL, ATOL = 1e-4, 1e-5


def emulated_env(devices: int | None = None) -> dict:
  """This environment on the CPU, with `devices` emulated CPU devices (None: as it is)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if devices is not None:
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  return env


# The one run both multi-device tests train: the :test config's frame view, holdout split,
# 'original' regime, CNN. As command-line flags (plus --config.num_seeds) and in-process.
ONE_RUN = ['--config.ablation.models=("cnn",)', '--config.ablation.regimes=("original",)']


def run_dir(workdir: str) -> str:
  return rundir.run_dir(workdir, 'frame', 'holdout', 'original', 'cnn')


def train_one_run(test_config, workdir: str, num_seeds: int) -> str:
  """ONE_RUN with `num_seeds` seeds in this process (the reference); -> workdir."""
  config = test_config.copy_and_resolve_references()
  with config.unlocked():
    config.num_seeds = num_seeds
    config.ablation.models = ('cnn',)
    config.ablation.regimes = ('original',)
  ablation.run(config, workdir, log=lambda s: None)
  return workdir


def per_seed(run: str) -> dict:
  """What must not depend on devices or processes: per-seed results, timings left out."""
  res = json.load(open(os.path.join(run, 'results.json')))
  return {k: v for k, v in res.items() if k != 'train_seconds'}


def assert_same_results(got_run: str, want_run: str) -> None:
  """Per-seed metrics and probabilities of two run directories: exact counts, close floats."""
  got, want = per_seed(got_run), per_seed(want_run)
  for key in ('seeds', 'best_epoch', 'best_val_accuracy', 'num_params'):
    assert got[key] == want[key], key
  for split in ('train', 'val', 'test'):
    for g, w in zip(got['splits'][split]['per_seed'], want['splits'][split]['per_seed'],
                    strict=True):
      for key in ('accuracy', 'balanced_accuracy', 'confusion_matrix', 'n'):
        assert g[key] == w[key], (split, key)
      np.testing.assert_allclose(g['nll'], w['nll'], rtol=RTOL, err_msg=split)
    assert (got['splits'][split]['ensemble']['accuracy']
            == want['splits'][split]['ensemble']['accuracy'])
  gp = np.load(os.path.join(got_run, 'predictions.npz'))
  wp = np.load(os.path.join(want_run, 'predictions.npz'))
  for key in ('val_probs', 'test_probs'):
    assert gp[key].shape == wp[key].shape, key
    np.testing.assert_allclose(gp[key], wp[key], rtol=RTOL, atol=ATOL, err_msg=key)
  np.testing.assert_array_equal(gp['test_image_ids'], wp['test_image_ids'])
