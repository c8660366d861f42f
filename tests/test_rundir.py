"""wbc_jax.rundir: the work directory's layout, and finding finished runs and GAN directories.

Restoring a finished run is exercised where a run is trained: prediction (tests/test_train.py,
tests/test_baseline.py) and the measures' feature CNN (tests/test_measures.py).
"""

import os

import numpy as np
import pytest

from fake_workdirs import make_kfold_workdir
from wbc_jax import rundir
from wbc_jax import utils


def test_paths():
  assert rundir.run_dir('w', 'crop', 'r0_k1', 'original+gan+trad', 'cnn') == os.path.join(
      'w', 'crop', 'r0_k1', 'original_gan_trad', 'cnn')
  assert rundir.gan_dir('w', 'frame', 'holdout', 'cond') == os.path.join(
      'w', 'frame', 'holdout', 'gan_cond')
  assert rundir.feature_cnn_dir('w', 'frame', 'holdout') == os.path.join(
      'w', 'frame', 'holdout', 'measures', 'feature_cnn')


def test_run_config_sets_the_run(test_config):
  config = rundir.run_config(test_config, 'crop', 'original+trad', 'cellnet')
  assert (config.data.view, config.regime, config.model) == ('crop', 'original+trad', 'cellnet')
  assert 'model' not in test_config and test_config.data.view == 'frame'


def test_find_runs_and_gan_dirs(tmp_path):
  workdir = make_kfold_workdir(tmp_path / 'w')
  # A finished feature CNN of the measures is a run of its own, not an ablation cell.
  feature = rundir.feature_cnn_dir(workdir, 'frame', 'r0_k0')
  os.makedirs(feature)
  utils.write_json(os.path.join(feature, rundir.RESULTS), {'model': 'cnn'})
  runs = rundir.find_runs(workdir)
  assert len(runs) == 6 * 4 + 1
  assert [r.path for r in runs] == sorted(r.path for r in runs)
  (leaky,) = [r for r in runs if r.leaky]
  assert (leaky.split, leaky.regime, leaky.model, leaky.protocol) == (
      'holdout', 'original+gan', 'cnn', 'paper')
  assert {r.protocol for r in runs if not r.leaky} == {'kfold'}
  z = runs[0].predictions(workdir)
  assert z['test_probs'].shape[0] == 2 and len(z['test_labels']) == len(z['test_image_ids'])
  os.remove(os.path.join(workdir, runs[0].path, rundir.PREDICTIONS))
  with pytest.raises(rundir.RunDirError, match='missing'):
    runs[0].predictions(workdir)

  gans = rundir.find_gan_dirs(workdir)
  assert [(g.view, g.split, g.kind) for g in gans] == [('frame', 'r0_k0', 'cond'),
                                                       ('frame', 'r0_k1', 'cond')]
  assert rundir.find_gan_dirs(workdir, with_synthetic=True) == []
  np.savez(os.path.join(gans[1].path, rundir.SYNTHETIC), images=np.zeros((0, 2, 2, 3)))
  assert rundir.find_gan_dirs(workdir, with_synthetic=True) == [gans[1]]


def test_restore_run_names_a_directory_that_is_not_a_run(tmp_path):
  with pytest.raises(rundir.RunDirError, match='no config.json'):
    rundir.restore_run(str(tmp_path))
