"""Evaluation protocols: the paper's leaky one is labelled so; honest ones stay honest.

The GAN is replaced by a recorder that returns noise images: what is tested is which images
it is trained on and where its samples go (GAN training itself: tests/test_gan.py).
"""

import json
import os

import numpy as np
import pytest

from wbc_jax import ablation
from wbc_jax import input_pipeline as ip
from wbc_jax import rundir
from wbc_jax.gan import sample as gan_sample
from wbc_jax.gan import train as gan_train


@pytest.fixture
def fake_gan(monkeypatch):
  """Records the GAN's training images; samples are uniform noise, grouped by class."""
  seen = []

  def train_gans(config, images, labels, *, num_classes, seeds, workdir, log=print):
    seen.append((np.array(images), np.array(labels)))
    os.makedirs(workdir, exist_ok=True)

  def generate(state, config, *, num_per_class, key, height, width, num_classes, **kw):
    rng = np.random.default_rng(len(seen))
    labels = np.repeat(np.arange(num_classes), num_per_class).astype(np.int32)
    return rng.uniform(size=(len(labels), height, width, 3)).astype(np.float32), labels

  monkeypatch.setattr(gan_train, 'train_gans', train_gans)
  monkeypatch.setattr(gan_sample, 'generate', generate)
  return seen


def _config(test_config, protocol, regimes):
  config = test_config.copy_and_resolve_references()
  with config.unlocked():
    config.split.protocol = protocol
    config.ablation.regimes = regimes
    config.ablation.models = ('cnn',)
    config.train.epochs = 1
    config.num_seeds = 1
  return config


def _run_files(workdir, split, regime):
  rdir = rundir.run_dir(workdir, 'frame', split, regime, 'cnn')
  with open(os.path.join(rdir, 'results.json')) as f:
    results = json.load(f)
  return results, np.load(os.path.join(rdir, 'predictions.npz'))


def test_validate_accepts_paper_and_rejects_unknown_protocols(test_config):
  ablation.validate(_config(test_config, 'paper', ('original', 'original+gan')))
  with pytest.raises(ValueError, match="unknown protocol 'loo'"):
    ablation.validate(_config(test_config, 'loo', ('original',)))


def test_pool_with_synthetic_marks_and_names_synthetic_images():
  real = ip.Examples(np.zeros((3, 2, 2, 3), np.uint8), np.array([0, 1, 1], np.int32),
                     np.array([4, 7, 9], np.int32), ('a', 'b'))
  pool = ip.pool_with_synthetic(real, np.ones((3, 2, 2, 3), np.uint8), np.array([1, 1, 0]))
  assert pool.image_ids.tolist() == ['4', '7', '9', 'synthetic_b_0', 'synthetic_b_1',
                                     'synthetic_a_0']
  assert pool.is_synthetic.tolist() == [False] * 3 + [True] * 3
  assert pool.labels.tolist() == [0, 1, 1, 1, 1, 0]
  assert pool.take(np.array([5, 0])).is_synthetic.tolist() == [True, False]
  assert real.take(np.array([0])).is_synthetic is None
  with pytest.raises(ValueError, match='already hold synthetic'):
    ip.pool_with_synthetic(pool, pool.images[:1], pool.labels[:1])


def test_paper_protocol_tests_on_synthetic_images_and_says_so(test_config, tmp_path, fake_gan):
  config = _config(test_config, 'paper', ('original', 'original+gan'))
  workdir = str(tmp_path)
  rows = ablation.run(config, workdir, log=lambda s: None)
  examples = ip.load_examples(config.data)

  # The GAN saw every real image of the view, and topped every class up to the target.
  (gan_images, gan_labels), = fake_gan
  np.testing.assert_array_equal(gan_images, examples.images / np.float32(255.0))
  gan_dir = os.path.join(workdir, 'frame', 'paper', f'gan_{config.gan.kind}')
  synthetic = np.load(os.path.join(gan_dir, 'synthetic.npz'))
  need = np.maximum(config.synthetic.target_per_class - np.bincount(examples.labels), 0)
  np.testing.assert_array_equal(np.bincount(synthetic['labels'], minlength=4), need)

  # The non-GAN regime: the plain holdout split of real images, not leaky.
  results, preds = _run_files(workdir, 'paper', 'original')
  holdout_config = config.split.copy_and_resolve_references()
  holdout_config.protocol = 'holdout'
  holdout = ip.make_splits(examples.labels, holdout_config)[0]
  np.testing.assert_array_equal(preds['test_image_ids'], examples.image_ids[holdout.test])
  assert (results['protocol'], results['leaky'], results['test_synthetic_fraction']) == (
      'paper', False, 0.0)

  # The GAN regime: the pool was split, so validation and test hold synthetic images.
  results, preds = _run_files(workdir, 'paper', 'original+gan')
  test_ids = preds['test_image_ids'].tolist()
  is_synthetic = np.array([i.startswith('synthetic_') for i in test_ids])
  assert 0 < is_synthetic.sum() < len(test_ids)
  assert any(i.startswith('synthetic_') for i in preds['val_image_ids'].tolist())
  assert results['protocol'] == 'paper' and results['leaky'] is True
  assert results['test_synthetic_fraction'] == pytest.approx(is_synthetic.mean())
  by_source = results['test_by_source']
  assert by_source['real']['ensemble']['n'] == (~is_synthetic).sum()
  assert by_source['synthetic']['ensemble']['n'] == is_synthetic.sum()
  real_acc = np.mean(preds['test_probs'][0, ~is_synthetic].argmax(-1)
                     == preds['test_labels'][~is_synthetic])
  assert by_source['real']['ensemble']['accuracy'] == pytest.approx(real_acc)
  # The pooled training split, counted apart.
  n_train = results['splits']['train']['ensemble']['n']
  assert results['n_train_real'] + results['n_train_extra'] == n_train
  assert 0 < results['n_train_extra'] and results['n_train_real'] < len(examples)
  pool_split = json.load(open(os.path.join(gan_dir, 'pool_split.json')))
  assert pool_split['test'] == test_ids

  # Marked in the summary rows and in summary.md.
  by_regime = {row['regime']: row for row in rows}
  assert by_regime['original+gan']['note'] == ablation.LEAKY_NOTE
  assert by_regime['original+gan']['test_synthetic_fraction'] == results['test_synthetic_fraction']
  assert by_regime['original']['note'] == ''
  summary = open(os.path.join(workdir, 'summary.md')).read()
  gan_line, = [l for l in summary.splitlines() if '| original+gan |' in l]
  assert ablation.LEAKY_NOTE in gan_line
  original_line, = [l for l in summary.splitlines() if '| original |' in l]
  assert 'LEAKY' not in original_line


def test_kfold_gan_regime_keeps_synthetic_images_out_of_evaluation(test_config, tmp_path,
                                                                   fake_gan, evaluated_images):
  """The holdout case is tests/test_train.py's; here a k-fold split, whose GAN sees that
  fold's training images only."""
  config = _config(test_config, 'kfold', ('original+gan',))
  with config.unlocked():
    config.split.max_splits = 1
  workdir = str(tmp_path)
  rows = ablation.run(config, workdir, log=lambda s: None)
  examples = ip.load_examples(config.data)
  split = ip.make_splits(examples.labels, config.split)[0]
  (gan_images, _), = fake_gan
  np.testing.assert_array_equal(gan_images, examples.images[split.train] / np.float32(255.0))
  assert rows[0]['n_synthetic'] > 0 and 'note' not in rows[0]
  results, preds = _run_files(workdir, split.name, 'original+gan')
  assert 'leaky' not in results and 'protocol' not in results
  np.testing.assert_array_equal(preds['val_image_ids'], examples.image_ids[split.val])
  np.testing.assert_array_equal(preds['test_image_ids'], examples.image_ids[split.test])
  real = {img.tobytes() for img in examples.images}
  seen = {img.tobytes() for batch in evaluated_images for img in batch}
  assert evaluated_images and seen <= real
