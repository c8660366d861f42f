"""wbc_jax.measures: KID, FID and nearest neighbours against hand-computed numbers,
the penultimate features, and the CLI end to end on an ablation of the :test config."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wbc_jax import ablation
from wbc_jax import input_pipeline as ip
from wbc_jax import measures
from wbc_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- KID


def test_mmd_and_kid_hand_computed():
  # d = 2, k(a, b) = (a.b / 2 + 1)^3: a.b = 1 gives 3.375, a.b = 0 gives 1.
  x = np.array([[1.0, 0.0], [1.0, 0.0]])
  y = np.array([[0.0, 1.0], [0.0, 1.0]])
  # Within x and within y (off the diagonal): 3.375; across: 1.  3.375 + 3.375 - 2 * 1.
  assert measures.mmd2_unbiased(x, y) == pytest.approx(4.75)
  # The diagonal is left out: here it would add nothing new, so a mixed pair checks it.
  a = np.array([[1.0, 0.0], [0.0, 1.0]])
  b = np.array([[1.0, 1.0], [0.0, 0.0]])
  # k_aa off-diagonal 1; k_bb off-diagonal 1; k_ab = [[3.375, 1], [3.375, 1]], mean 2.1875.
  assert measures.mmd2_unbiased(a, b) == pytest.approx(1 + 1 - 2 * 2.1875)
  # Subsets of size 2 of 2-sample sets are the whole sets: every subset gives 4.75.
  result = measures.kid(x, y, num_subsets=5)
  assert result['mean'] == pytest.approx(4.75) and result['std'] == pytest.approx(0.0)
  assert result['subset_size'] == 2
  assert measures.kid(x[:1], y) is None


def test_kid_same_set_is_zero_different_sets_are_not():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 16))
  same = measures.kid(x, x, num_subsets=50, subset_size=100)
  other_sample = measures.kid(x, rng.normal(size=(200, 16)), num_subsets=50, subset_size=100)
  shifted = measures.kid(x, rng.normal(loc=1.0, size=(200, 16)), num_subsets=50, subset_size=100)
  assert shifted['mean'] > 5 and shifted['mean'] > 10 * shifted['std']
  # Subsets of one set share points, whose k(x_i, x_i) lands in the cross term only: a
  # slightly negative value, two orders of magnitude below the shifted set's.
  assert -0.01 * shifted['mean'] < same['mean'] <= 0
  assert abs(other_sample['mean']) < 3 * other_sample['std']


# ----------------------------------------------------------------------------- FID


def test_fid_identical_sets_and_one_dimensional_closed_form():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 5))
  assert measures.fid(x, x) == pytest.approx(0.0, abs=1e-8)
  a = rng.normal(0.0, 1.0, size=(500, 1))
  b = rng.normal(3.0, 2.0, size=(400, 1))
  # For 1-D Gaussians: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2.
  closed = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
  assert measures.fid(a, b) == pytest.approx(closed, rel=1e-9)
  assert closed == pytest.approx(9 + 1, rel=0.15)
  assert measures.fid(a[:1], b) is None
  # Fewer samples than features (as per class here): singular covariances, finite FID.
  assert np.isfinite(measures.fid(rng.normal(size=(10, 32)), rng.normal(size=(12, 32))))


# ----------------------------------------------------------------------------- memorisation


def test_nearest_neighbours_hand_made():
  references = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
  queries = np.array([[0.0, 1.0], [3.0, 3.0], [9.0, 0.0], [3.0, 4.0]])
  d, index = measures.nearest_neighbours(queries, references)
  np.testing.assert_allclose(d, [1.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(index, [0, 1, 2, 1])
  d, index = measures.nearest_neighbours(references, references, leave_one_out=True)
  np.testing.assert_allclose(d, [5.0, 5.0, np.sqrt(65.0)])
  np.testing.assert_array_equal(index, [1, 0, 1])


def test_memorisation_flags_a_copy():
  real = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
  real_y = np.array([0, 0, 1])
  fake = np.array([[3.0, 4.0], [9.0, 0.0]])  # a copy of real 1; 1 away from real 2
  fake_y = np.array([0, 1])
  summary, d, index = measures.memorisation(real, real_y, fake, fake_y, ('a', 'b'))
  np.testing.assert_allclose(d, [0.0, 1.0])
  assert summary['per_class']['a']['synthetic_to_real']['min'] == 0.0
  assert summary['per_class']['a']['real_to_real']['median'] == pytest.approx(5.0)
  assert summary['overall']['median_ratio'] == pytest.approx(0.5 / 5.0)
  assert summary['overall']['nearest_real_same_class'] == 1.0


# ----------------------------------------------------------------------------- features


def test_features_are_the_penultimate_layer():
  model = models.CNN(num_classes=4)
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 10, 12, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  features = measures.extract_features(
      model, variables, np.asarray(images * 255).round().astype(np.uint8), batch_size=2)
  assert features.shape == (3, 128) and (features >= 0).all()
  # The last layer on these features gives the model's logits (dropout is off in eval).
  head = variables['params']['ClassifierHead_0']['Dense_1']
  logits = model.apply(variables, jnp.asarray(np.round(np.asarray(images) * 255) / 255.0),
                       train=False)
  np.testing.assert_allclose(features @ head['kernel'] + head['bias'], logits, atol=1e-4)


# ----------------------------------------------------------------------------- end to end


def planted_synthetic(examples, split, target):
  """What the GAN cache of the split would hold, without training a GAN (tests/test_gan.py
  and tests/test_train.py train them): each class topped up to `target` with noisy,
  mirrored training images, the first of MONOCYTE an exact copy of a training image.
  Returns (uint8 images [M, H, W, 3], labels [M], index into examples of the copy)."""
  rng = np.random.default_rng(0)
  train_y = examples.labels[split.train]
  images, labels = [], []
  for c in range(len(examples.class_names)):
    own = split.train[train_y == c]
    need = max(target - len(own), 0)
    x = examples.images[own[np.arange(need) % len(own)]][:, :, ::-1].astype(np.float64)
    images.append(np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8))
    labels.append(np.full(need, c, np.int32))
  monocyte = examples.class_names.index('MONOCYTE')
  copied = split.train[train_y == monocyte][3]
  images[monocyte][0] = examples.images[copied]
  return np.concatenate(images), np.concatenate(labels), copied


@pytest.fixture(scope='module')
def measured(test_config, tmp_path_factory):
  """An ablation of the :test config (regimes original + original+gan, CNN, 1 epoch, 1 seed) whose
  GAN cache is planted, then the measures CLI on its work directory."""
  workdir = str(tmp_path_factory.mktemp('measures'))
  config = test_config.copy_and_resolve_references()
  with config.unlocked():
    config.ablation.models = ('cnn',)
    config.ablation.regimes = ('original', 'original+gan')
    config.train.epochs = 1
    config.num_seeds = 1
  examples = ip.load_examples(config.data)
  split = ip.make_splits(examples.labels, config.split)[0]
  images, labels, copied = planted_synthetic(examples, split, config.synthetic.target_per_class)
  gan_dir = os.path.join(workdir, 'frame', 'holdout', f'gan_{config.gan.kind}')
  os.makedirs(gan_dir)
  np.savez(os.path.join(gan_dir, 'synthetic.npz'), images=images, labels=labels)
  ablation.run(config, workdir, log=lambda s: None)
  proc = subprocess.run([sys.executable, '-m', 'wbc_jax.measures', f'--workdir={workdir}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir, proc.stdout, int(examples.image_ids[copied]), config


@pytest.mark.slow
def test_measures_cli_end_to_end(measured, test_config):
  workdir, stdout, copied_id, _ = measured
  gan_dir = os.path.join(workdir, 'frame', 'holdout', f'gan_{test_config.gan.kind}')
  assert '[1/1] frame/holdout/gan_' in stdout and 'measuring' in stdout and 'CAS' in stdout
  m = json.load(open(os.path.join(gan_dir, 'measures.json')))
  names = ['EOSINOPHIL', 'LYMPHOCYTE', 'MONOCYTE', 'NEUTROPHIL']
  assert (m['view'], m['split'], m['protocol']) == ('frame', 'holdout', 'holdout')
  assert 'leaky' not in m
  # The GAN's real images are the split's training images; synthetic ones top up to 40.
  examples = ip.load_examples(test_config.data)
  split = ip.make_splits(examples.labels, test_config.split)[0]
  n_train = len(split.train)
  assert m['n_real'] == ip.class_counts(examples.labels[split.train], examples.class_names)
  assert all(m['n_real'][n] + m['n_synthetic'][n] == max(m['n_real'][n], 40) for n in names)
  # The ablation's own original CNN run gives the features.
  assert m['feature_space']['run_dir'] == os.path.join('frame', 'holdout', 'original', 'cnn')
  assert m['cas']['run_dir'] == os.path.join('frame', 'holdout', 'gan_cond', 'cas')
  assert m['feature_space']['dim'] == 128
  assert m['kid']['overall']['std'] >= 0 and np.isfinite(m['kid']['overall']['mean'])
  assert set(m['kid']['per_class']) == set(names) == set(m['fid']['per_class'])
  # NEUTROPHIL has more than 40 training images: no synthetic ones, no per-class distance.
  assert m['n_synthetic']['NEUTROPHIL'] == 0 and m['kid']['per_class']['NEUTROPHIL'] is None
  assert m['kid']['per_class']['MONOCYTE']['mean'] is not None
  assert m['fid']['overall'] >= 0
  assert any('FID is strongly biased' in note for note in m['notes'])
  # The planted copy of a training image is found, at distance 0, in both spaces.
  for space in ('feature', 'pixel'):
    mem = m['memorisation'][space]
    assert mem['closest'][0]['nearest_real_image_id'] == copied_id
    assert mem['closest'][0]['distance'] == pytest.approx(0.0, abs=1e-5)
    assert mem['per_class']['MONOCYTE']['synthetic_to_real']['min'] == pytest.approx(0.0, abs=1e-5)
    assert mem['overall']['synthetic_to_real']['n'] == sum(m['n_synthetic'].values())
    assert mem['overall']['real_to_real']['n'] == n_train
    to_real = mem['overall']['synthetic_to_real']
    assert to_real['min'] <= to_real['median']
    assert len(mem['closest']) == 8
  assert 0 <= m['memorisation']['pixel']['overall']['synthetic_to_real']['median'] <= 1
  cas = m['cas']
  assert cas['n_train_synthetic'] == sum(m['n_synthetic'].values()) and cas['n_test_real'] == 44
  assert 0 <= cas['accuracy_mean'] <= 1 and 0 <= cas['balanced_accuracy_ensemble'] <= 1
  assert 0 <= cas['real_trained']['accuracy_mean'] <= 1
  assert os.path.exists(os.path.join(gan_dir, 'cas', 'results.json'))
  for name in m['files']:
    assert os.path.getsize(os.path.join(gan_dir, name)) > 0
  assert sorted(m['files']) == ['closest_pairs_feature.png', 'closest_pairs_pixel.png',
                                'real_vs_synthetic.png']


@pytest.mark.slow
def test_measured_gans_are_skipped(measured, test_config):
  workdir = measured[0]
  lines = []
  assert measures.measure_workdir(workdir, log=lines.append) == []
  assert lines == [f'[1/1] frame/holdout/gan_{test_config.gan.kind}: measured, skipped']


def test_ablation_switch_calls_the_measures(measured, monkeypatch):
  """With synthetic.measures the driver measures its work directory after its runs."""
  workdir, _, _, config = measured
  calls = []
  monkeypatch.setattr(measures, 'measure_workdir',
                      lambda w, config, log: calls.append((w, config.synthetic.measures)))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.synthetic.measures = True
  lines = []
  ablation.run(config, workdir, log=lines.append)
  assert sum('complete, skipped' in line for line in lines) == 2  # nothing retrained
  assert calls == [(workdir, True)]


def test_feature_cnn_is_trained_when_the_original_run_is_absent(test_config, tmp_path,
                                                                monkeypatch):
  calls = []
  monkeypatch.setattr(measures, '_train_once',
                      lambda config, run_dir, **kw: calls.append((config, run_dir, kw)))
  examples = ip.load_examples(test_config.data)
  split = ip.make_splits(examples.labels, test_config.split)[0]
  run_dir = measures.feature_run(test_config, str(tmp_path), 'frame', examples, split,
                                 log=lambda s: None)
  assert run_dir == os.path.join(str(tmp_path), 'frame', 'holdout', 'measures', 'feature_cnn')
  (config, called_dir, kw), = calls
  assert called_dir == run_dir and kw['split'] is split
  assert (config.model, config.regime, config.data.view) == ('cnn', 'original', 'frame')


def test_cas_classifier_gets_the_real_trained_cnns_updates(test_config, monkeypatch):
  """CAS trains on ~6x more (synthetic) images than the real-trained CNN; it gets the same
  number of steps per epoch, not 6x more, under either steps_per_epoch_basis."""
  examples = ip.load_examples(test_config.data)
  split = ip.make_splits(examples.labels, test_config.split)[0]
  n_synthetic = 6 * len(split.train)
  images = np.zeros((n_synthetic, *examples.images.shape[1:]), np.uint8)
  labels = np.arange(n_synthetic) % 4
  test = {'seed_summary': {k: {'mean': 0.5, 'std': 0.0} for k in ('accuracy', 'balanced_accuracy')},
          'ensemble': {'accuracy': 0.5, 'balanced_accuracy': 0.5}}
  for basis in ('all', 'real'):
    config = test_config.copy_and_resolve_references()
    with config.unlocked():
      config.train.max_steps_per_epoch = -1
      config.train.steps_per_epoch_basis = basis
    calls = []

    def fake_train_once(run_config, run_dir, *, examples, split, log):
      calls.append((run_config, examples, split))
      return {'splits': {'test': test}, 'seeds': [0, 1]}

    monkeypatch.setattr(measures, '_train_once', fake_train_once)
    out = measures.classification_accuracy_score(config, '/nonexistent/cas', examples=examples,
                                                 split=split, images=images, labels=labels)
    (run_config, cas_examples, cas_split), = calls
    want = -(-len(split.train) // config.train.batch_size)
    assert run_config.train.max_steps_per_epoch == want == out['steps_per_epoch']
    assert len(cas_split.train) == n_synthetic and cas_examples.is_synthetic[cas_split.train].all()
    assert not cas_examples.is_synthetic[np.concatenate([cas_split.val, cas_split.test])].any()
    assert config.train.max_steps_per_epoch == -1  # the caller's config is left alone
