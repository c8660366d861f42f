"""Metrics, statistics and plots against numbers worked out by hand."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm
from sklearn.metrics import accuracy_score

from wbc_jax import metrics, plots, stats, utils

CLASS_NAMES = ('EOSINOPHIL', 'LYMPHOCYTE', 'MONOCYTE', 'NEUTROPHIL')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

# Ten examples, four classes. By hand:
#   true 0 -> predicted 0, 0, 1   true 1 -> 1, 1   true 2 -> 2, 0, 2   true 3 -> 3, 2
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
PREDS = np.array([0, 0, 1, 1, 1, 2, 0, 2, 3, 2])


def soft_probs(preds, num_classes=4, high=0.7):
  """0.7 on the predicted class, 0.1 on each other class."""
  probs = np.full((len(preds), num_classes), (1 - high) / (num_classes - 1))
  probs[np.arange(len(preds)), preds] = high
  return probs


def test_classification_metrics_by_hand():
  m = metrics.classification_metrics(LABELS, soft_probs(PREDS), CLASS_NAMES)
  assert m['n'] == 10
  assert m['confusion_matrix'] == [[2, 1, 0, 0],
                                   [0, 2, 0, 0],
                                   [1, 0, 2, 0],
                                   [0, 0, 1, 1]]
  assert m['accuracy'] == pytest.approx(7 / 10)
  # Recalls 2/3, 2/2, 2/3, 1/2.
  assert m['balanced_accuracy'] == pytest.approx((2 / 3 + 1 + 2 / 3 + 1 / 2) / 4)
  # Precisions (columns) 2/3, 2/3, 2/3, 1/1 -> F1 2/3, 4/5, 2/3, 2/3.
  assert m['macro_f1'] == pytest.approx((2 / 3 + 4 / 5 + 2 / 3 + 2 / 3) / 4)
  lympho = m['per_class']['LYMPHOCYTE']
  assert lympho == pytest.approx({'precision': 2 / 3, 'recall': 1.0, 'f1': 0.8, 'support': 2})
  neutro = m['per_class']['NEUTROPHIL']
  assert neutro == pytest.approx({'precision': 1.0, 'recall': 0.5, 'f1': 2 / 3, 'support': 2})
  # Seven true classes get 0.7, three get 0.1.
  assert m['nll'] == pytest.approx(-(7 * math.log(0.7) + 3 * math.log(0.1)) / 10)
  json.dumps(m)  # Must be writable as is.


def test_confusion_matrix_keeps_absent_classes_and_nll_is_finite():
  labels = np.array([0, 1, 1])
  one_hot = np.eye(4)[[0, 1, 0]]
  m = metrics.classification_metrics(labels, one_hot, CLASS_NAMES)
  assert m['confusion_matrix'] == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
  # Balanced accuracy averages recall over the two classes present: (1 + 1/2) / 2.
  assert m['balanced_accuracy'] == pytest.approx(0.75)
  assert m['per_class']['MONOCYTE'] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0,
                                        'support': 0}
  # One certain mistake: clipped at 1e-12 instead of inf.
  assert m['nll'] == pytest.approx(-math.log(1e-12) / 3)


def test_balanced_accuracy_matches_sklearn_definition():
  from sklearn.metrics import balanced_accuracy_score
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=40)  # Class 3 absent from the labels ...
  preds = rng.integers(0, 4, size=40)  # ... but predicted: dropped, as in sklearn.
  m = metrics.classification_metrics(labels, np.eye(4)[preds], CLASS_NAMES)
  with pytest.warns(UserWarning):
    expected = balanced_accuracy_score(labels, preds)
  assert m['balanced_accuracy'] == pytest.approx(expected)


def test_ensemble_is_mean_of_probabilities_not_of_accuracies():
  label = np.array([1])
  seed_a = np.array([[0.5, 0.4, 0.1, 0.0]])  # argmax 0: wrong
  seed_b = np.array([[0.1, 0.4, 0.5, 0.0]])  # argmax 2: wrong
  ens = metrics.ensemble_probs(np.stack([seed_a, seed_b]))
  np.testing.assert_allclose(ens, [[0.3, 0.4, 0.3, 0.0]])
  assert ens.argmax(axis=1)[0] == 1  # Differs from both seeds' argmax.
  per_seed = [metrics.classification_metrics(label, p, CLASS_NAMES) for p in (seed_a, seed_b)]
  assert metrics.summarize_seeds(per_seed)['accuracy']['mean'] == 0.0
  assert metrics.classification_metrics(label, ens, CLASS_NAMES)['accuracy'] == 1.0


def test_summarize_seeds():
  per_seed = [{'accuracy': 0.7, 'macro_f1': 0.5}, {'accuracy': 0.8, 'macro_f1': 0.6},
              {'accuracy': 0.9, 'macro_f1': 0.4}]
  s = metrics.summarize_seeds(per_seed, keys=('accuracy', 'macro_f1'))
  assert s['accuracy']['values'] == [0.7, 0.8, 0.9]
  assert s['accuracy']['mean'] == pytest.approx(0.8)
  assert s['accuracy']['std'] == pytest.approx(0.1)  # ddof=1: sqrt((0.01 + 0 + 0.01) / 2)
  assert (s['macro_f1']['min'], s['macro_f1']['max']) == (0.4, 0.6)
  single = metrics.summarize_seeds([{'accuracy': 0.7}], keys=('accuracy',))
  assert single['accuracy']['std'] == 0.0


def test_majority_baseline():
  train = np.array([0, 0, 0, 1, 2, 3, 3])  # Class 0 is the majority.
  evaluation = np.array([0, 1, 1, 3])
  m = metrics.majority_baseline(train, evaluation, 4, CLASS_NAMES)
  assert m['majority_class'] == 0
  assert m['accuracy'] == pytest.approx(1 / 4)
  # Recall 1 for class 0, 0 for classes 1 and 3 (class 2 is absent from eval).
  assert m['balanced_accuracy'] == pytest.approx(1 / 3)
  # F1 of class 0: precision 1/4, recall 1 -> 0.4; classes 1 and 3: 0.
  assert m['macro_f1'] == pytest.approx(0.4 / 3)
  assert m['confusion_matrix'] == [[1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
  # The NLL is that of the training prior (3/7, 1/7, 1/7, 2/7).
  expected_nll = -(math.log(3 / 7) + 2 * math.log(1 / 7) + math.log(2 / 7)) / 4
  assert m['nll'] == pytest.approx(expected_nll)


def test_format_markdown_table():
  rows = [{'method': 'trad', 'accuracy': 0.8234, 'nll': 0.51234, 'n': 120},
          {'method': 'GAN|trad', 'accuracy': 0.9, 'n': 120}]
  table = metrics.format_markdown_table(
      rows, ['method', 'accuracy', 'nll', 'n'], headers=['Method', 'Acc. (%)', 'NLL', 'N'],
      percent_columns={'accuracy'})
  assert table == ('| Method | Acc. (%) | NLL | N |\n'
                   '|---|---|---|---|\n'
                   '| trad | 82.3 | 0.512 | 120 |\n'
                   '| GAN\\|trad | 90.0 |  | 120 |\n')


@pytest.mark.filterwarnings('ignore:y_pred contains classes not in y_true')
@pytest.mark.parametrize('seed', range(5))
def test_metrics_of_classes_equal_sklearns(seed):
  rng = np.random.default_rng(seed)
  labels = rng.choice(4, size=30, p=[0.1, 0.2, 0.0, 0.7])  # class 2 absent from the labels
  preds = rng.integers(0, 4, size=30)
  assert metrics.accuracy(labels, preds, 4) == pytest.approx(skm.accuracy_score(labels, preds))
  assert metrics.balanced_accuracy(labels, preds, 4) == pytest.approx(
      skm.balanced_accuracy_score(labels, preds))
  assert metrics.macro_f1(labels, preds, 4) == pytest.approx(
      skm.f1_score(labels, preds, average='macro', zero_division=0))
  expected = skm.recall_score(labels, preds, labels=[0, 1, 3], average=None)
  np.testing.assert_allclose(metrics.recalls(labels, preds, 4)[[0, 1, 3]], expected)
  assert np.isnan(metrics.recalls(labels, preds, 4)[2])
  # Equal to the last bit (per-epoch curves and the floor select on it), with or without C.
  assert metrics.balanced_accuracy(labels, preds) == metrics.balanced_accuracy(labels, preds, 4)
  assert metrics.balanced_accuracy(labels, preds) == skm.recall_score(
      labels, preds, labels=np.unique(labels), average='macro', zero_division=0)


def test_pool_repeat_sorts_by_image_and_rejects_duplicates():
  parts = [(np.array([7, 3]), np.array([1, 0]), np.array([[0.2, 0.8], [0.9, 0.1]])),
           (np.array([5]), np.array([1]), np.array([[0.4, 0.6]]))]
  ids, labels, probs = stats.pool_repeat(parts)
  np.testing.assert_array_equal(ids, [3, 5, 7])
  np.testing.assert_array_equal(labels, [0, 1, 1])
  np.testing.assert_allclose(probs, [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
  with pytest.raises(ValueError, match='more than once'):
    stats.pool_repeat(parts + [(np.array([3]), np.array([0]), np.array([[1.0, 0.0]]))])


def test_align_repeats_keeps_first_repeat_when_images_differ():
  a = (np.array([1, 2]), np.array([0, 1]), np.array([[0.9, 0.1], [0.3, 0.7]]))
  b = (np.array([1, 2]), np.array([0, 1]), np.array([[0.1, 0.9], [0.3, 0.7]]))
  c = (np.array([1, 3]), np.array([0, 1]), np.array([[0.9, 0.1], [0.3, 0.7]]))
  ids, labels, preds, probs, note = stats.align_repeats([a, b])
  np.testing.assert_array_equal(preds, [[0, 1], [1, 1]])
  assert probs.shape == (2, 2, 2) and note == ''
  _, _, preds, _, note = stats.align_repeats([a, c])
  assert preds.shape == (1, 2) and 'first repeat' in note


def test_pooled_estimate_averages_repeats_with_shared_resamples():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
  p0 = np.array([0, 0, 1, 1, 1, 2, 2, 2, 0, 2])
  p1 = np.array([0, 1, 1, 1, 0, 2, 2, 2, 2, 2])
  fn = metrics.balanced_accuracy
  both = stats.pooled_estimate(labels, np.stack([p0, p1]), fn, 3, n_boot=300, seed=0)
  expected = np.mean([skm.balanced_accuracy_score(labels, p) for p in (p0, p1)])
  assert both['point'] == pytest.approx(expected)
  assert both['low'] <= both['point'] <= both['high']
  # Two identical repeats are one repeat: same point and the same interval (same resamples).
  twice = stats.pooled_estimate(labels, np.stack([p0, p0]), fn, 3, n_boot=300, seed=0)
  once = stats.pooled_estimate(labels, p0, fn, 3, n_boot=300, seed=0)
  assert twice == pytest.approx(once)


def test_paired_difference():
  labels = np.array([0, 0, 1, 1, 1, 1])
  a = np.array([0, 0, 1, 1, 1, 0])
  same = stats.paired_difference(labels, a[None], a[None], metrics.accuracy, 2, n_boot=100,
                                  seed=0)
  assert same == {'point': 0.0, 'low': 0.0, 'high': 0.0}
  b = np.array([1, 0, 1, 1, 0, 0])
  diff = stats.paired_difference(labels, a[None], b[None], metrics.accuracy, 2, n_boot=100,
                                  seed=0)
  assert diff['point'] == pytest.approx(2 / 6)
  assert diff['low'] <= diff['point'] <= diff['high']


def test_mcnemar_by_hand():
  # 1 example only a gets right, 6 only b gets right, 5 both right, 3 both wrong.
  labels = np.zeros(15, dtype=int)
  a_right = np.array([1] * 1 + [0] * 6 + [1] * 5 + [0] * 3, dtype=bool)
  b_right = np.array([0] * 1 + [1] * 6 + [1] * 5 + [0] * 3, dtype=bool)
  preds_a = np.where(a_right, 0, 1)
  preds_b = np.where(b_right, 0, 2)
  r = stats.mcnemar_exact(labels, preds_a, preds_b)
  assert (r['b'], r['c']) == (1, 6)
  # Two-sided exact: 2 * P(X <= 1), X ~ Binomial(7, 1/2) = 2 * (1 + 7) / 128.
  expected = 2 * sum(math.comb(7, k) for k in range(2)) / 2**7
  assert expected == 0.125
  assert r['p'] == pytest.approx(expected)
  assert stats.mcnemar_exact(labels, preds_a, preds_a) == {'b': 0, 'c': 0, 'p': 1.0}


def test_holm_by_hand():
  # Sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04; running max -> 0.06 for 0.04.
  assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 0.5 * 2 = 1, clipped.
  assert stats.holm([0.2]) == pytest.approx([0.2])


def test_corrected_resampled_ttest_by_hand():
  a = np.array([11.0, 12.0, 13.0, 14.0, 15.0])
  b = np.full(5, 10.0)  # d = 1..5: mean 3, sample variance 2.5.
  r = stats.corrected_resampled_ttest(a, b, n_train=80, n_test=20)
  se = math.sqrt((1 / 5 + 20 / 80) * 2.5)  # sqrt(1.125)
  t = 3 / se  # = 2 * sqrt(2)
  # Student-t CDF with 4 degrees of freedom in closed form: with x = t / sqrt(4 + t^2),
  # F(t) = 1/2 + (3/4) x (1 - x^2 / 3).
  x = t / math.sqrt(4 + t * t)
  p = 2 * (1 - (0.5 + 0.75 * x * (1 - x * x / 3)))
  assert r['mean_diff'] == pytest.approx(3.0)
  assert r['t'] == pytest.approx(2 * math.sqrt(2))
  assert r['t'] == pytest.approx(t)
  assert r['df'] == 4
  assert r['p'] == pytest.approx(p)
  assert r['p'] == pytest.approx(0.04742, abs=1e-5)
  t_crit = 2.7764451051977987  # 97.5% quantile of Student t, 4 df.
  assert r['ci_low'] == pytest.approx(3 - t_crit * se)
  assert r['ci_high'] == pytest.approx(3 + t_crit * se)


def test_corrected_ttest_edge_cases():
  r = stats.corrected_resampled_ttest([0.8, 0.9, 0.7], [0.8, 0.9, 0.7], n_train=9, n_test=1)
  assert (r['t'], r['p'], r['mean_diff']) == (0.0, 1.0, 0.0)
  with pytest.raises(ValueError):
    stats.corrected_resampled_ttest([1, 2, 3], [1, 2], n_train=9, n_test=1)
  with pytest.raises(ValueError):
    stats.corrected_resampled_ttest([1], [2], n_train=9, n_test=1)


def test_stratified_bootstrap():
  rng = np.random.default_rng(123)
  labels = np.repeat([0, 1, 2, 3], [30, 10, 15, 5])
  preds = np.where(rng.random(labels.size) < 0.75, labels, (labels + 1) % 4)

  # Every resample keeps the class counts and draws each index from its own class.
  draw_rng = np.random.default_rng(0)
  for _ in range(50):
    idx = stats.stratified_bootstrap_indices(labels, draw_rng)
    assert idx.shape == labels.shape
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [30, 10, 15, 5])

  first = stats.stratified_bootstrap_ci(labels, preds, accuracy_score, n_boot=300, seed=7)
  second = stats.stratified_bootstrap_ci(labels, preds, accuracy_score, n_boot=300, seed=7)
  assert first == second
  point, low, high = first
  assert point == pytest.approx(accuracy_score(labels, preds))
  assert low <= point <= high
  assert low < high
  other = stats.stratified_bootstrap_ci(labels, preds, accuracy_score, n_boot=300, seed=8)
  assert other[1:] != first[1:]


def test_paired_difference_sentence():
  result = {'mean_diff': 0.032, 'ci_low': -0.010, 'ci_high': 0.074, 'p': 0.21}
  assert stats.paired_difference_sentence(
      'GAN+trad', 'trad (CNN-RNN)', 'balanced accuracy', result, 0.63) == (
          'GAN+trad vs trad (CNN-RNN): +3.2 points balanced accuracy, 95% CI [-1.0, 7.4], '
          'corrected t-test p = 0.21 (Holm-adjusted 0.63): not significant at 0.05.')
  worse = {'mean_diff': -0.05, 'ci_low': -0.08, 'ci_high': -0.02, 'p': 0.0004}
  sentence = stats.paired_difference_sentence('A', 'B', 'accuracy', worse, 0.0012)
  assert sentence == ('A vs B: -5.0 points accuracy, 95% CI [-8.0, -2.0], corrected t-test '
                      'p < 0.001 (Holm-adjusted 0.001): significant at 0.05 (B is higher).')


def assert_png(path):
  data = path.read_bytes()
  assert len(data) > 100
  assert data[:8] == PNG_MAGIC


def test_plots_write_png(tmp_path):
  history = [
      {'epoch': e, 'train_loss': [1.0 / e, 1.1 / e], 'train_acc': [0.5 + 0.1 * e, 0.55 + 0.1 * e],
       'val_loss': [1.2 / e, 1.3 / e], 'val_acc': [0.5 + 0.08 * e, 0.52 + 0.08 * e],
       'test_loss': [1.25 / e, 1.3 / e], 'test_acc': [0.5 + 0.07 * e, 0.5 + 0.08 * e]}
      for e in (1, 2, 3)
  ]
  plots.plot_learning_curves(history, tmp_path / 'curves.png', title='CNN-RNN, 2 seeds')
  assert_png(tmp_path / 'curves.png')

  cm = [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]  # Last class absent.
  plots.plot_confusion_matrix(cm, CLASS_NAMES, tmp_path / 'cm.png', title='test set')
  assert_png(tmp_path / 'cm.png')
  plots.plot_confusion_matrix(cm, CLASS_NAMES, tmp_path / 'cm_counts.png', title='counts',
                              normalize=False)
  assert_png(tmp_path / 'cm_counts.png')

  counts = {'train': {name: 100 + i for i, name in enumerate(CLASS_NAMES)},
            'val': {name: 20 for name in CLASS_NAMES},
            'test': {name: 25 for name in CLASS_NAMES[:3]}}
  plots.plot_class_histogram(counts, tmp_path / 'hist' / 'classes.png', title='class counts')
  assert_png(tmp_path / 'hist' / 'classes.png')

  rows, cols, h, w = 2, 3, 8, 5
  floats = np.random.default_rng(0).random((rows, cols, h, w, 3))
  plots.save_image_grid(floats, tmp_path / 'grids' / 'grid.png')
  assert_png(tmp_path / 'grids' / 'grid.png')
  assert os.listdir(tmp_path / 'grids') == ['grid.png']  # no temporary file left
  grid = np.asarray(Image.open(tmp_path / 'grids' / 'grid.png'))
  # One pixel per pixel, 2 px white gaps around and between the images.
  assert grid.shape == (rows * (h + 2) + 2, cols * (w + 2) + 2, 3)
  np.testing.assert_array_equal(grid[2:2 + h, 2:2 + w],
                                (floats[0, 0] * 255 + 0.5).astype(np.uint8))
  assert (grid[:2] == 255).all() and (grid[:, 2 + w:4 + w] == 255).all()
  with pytest.raises(ValueError, match='rows, cols'):
    plots.save_image_grid(floats[0], tmp_path / 'bad.png')


def test_format_duration_and_atomic_json(tmp_path):
  assert utils.format_duration(5.4) == '5s'
  assert utils.format_duration(125) == '2m05s'
  assert utils.format_duration(3723) == '1h02m03s'
  assert utils.format_duration(float('inf')) == '?'
  assert utils.format_duration(float('nan')) == '?'
  path = tmp_path / 'sub' / 'x.json'
  utils.write_json(str(path), {'a': np.float32(0.5), 'b': (1, 2), 'c': np.arange(2)})
  assert json.loads(path.read_text()) == {'a': 0.5, 'b': [1, 2], 'c': [0, 1]}
  assert [p.name for p in path.parent.iterdir()] == ['x.json']  # no temporary file left
