r"""The report: `python -m wbc_jax.report --workdir=DIR` writes DIR/REPORT.md.

Built only from the files a finished ablation leaves in its work directory (config.json,
<view>/splits.json, each run's results.json, predictions.npz and learning curves, the GAN
directories), so it can be rebuilt at any time without training. Figures go to DIR/report/,
and DIR/report/report.json holds every number REPORT.md prints.

What a cell is: one (view, protocol, regime, model), aggregated over its splits (folds x
repeats, or the one holdout split) and its seeds.
  - mean +/- SD: over every (split, seed) pair, of the per-seed test metrics in results.json;
  - pooled out-of-fold (OOF): the seed ensemble's (mean probability) test predictions of all
    folds of one repeat, concatenated; every image is tested exactly once per repeat. The
    metric is computed once on the pool, with a stratified bootstrap interval over images.
    With several repeats the point is the mean over repeats of the per-repeat pooled metric,
    and each bootstrap resample of images is applied to every repeat at once: repeats are
    re-partitions of the same images, not new test images, so the interval does not shrink
    with the number of repeats.
  - the majority baseline: always the most frequent class of each split's training images.

Comparisons (same view and protocol): regimes for the same model, models for the same regime,
on balanced accuracy. Per-split paired scores go to the Nadeau-Bengio corrected resampled
t-test (undefined with one split); the pooled OOF predictions, aligned by image id, go to the
exact McNemar test and to a paired stratified bootstrap of the difference. Holm's correction
runs over each family (all comparisons of one view and protocol, separately per test).

Runs of the paper's leaky protocol (`split.protocol='paper'`, or a split named 'paper...')
are reported in their own section, labelled LEAKY, and never enter the honest tables or tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import importlib.metadata
import itertools
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from wbc_jax import metrics as metrics_lib
from wbc_jax import paper_results
from wbc_jax import stats
from wbc_jax import utils

# Display order and names; regimes follow ablation.KNOWN_REGIMES (not imported: it pulls in
# JAX and TensorFlow, which a report does not need).
REGIME_ORDER = ('original', 'original+trad', 'original+gan', 'original+gan+trad')
REGIME_NAMES = {'original': 'original', 'original+trad': 'trad', 'original+gan': 'GAN',
                'original+gan+trad': 'GAN+trad'}
MODEL_ORDER = ('cnn', 'cnn_rnn', 'resnet', 'cellnet', 'floor')
MODEL_NAMES = {'cnn': 'CNN', 'cnn_rnn': 'CNN-RNN', 'resnet': 'ResNet', 'cellnet': 'cellnet',
               'floor': 'non-deep floor'}
PROTOCOL_ORDER = ('kfold', 'holdout', 'paper')
METRIC_NAMES = {'accuracy': 'accuracy', 'balanced_accuracy': 'balanced accuracy',
                'macro_f1': 'macro-F1'}
COMPARISON_METRIC = 'balanced_accuracy'
# The synthetic-data measures shown in REPORT.md when present (wbc_jax.gan.measures writes
# them); everything else stays in the linked measures.json.
HEADLINE_MEASURES = ('kid.overall.mean', 'kid.overall.std', 'fid.overall',
                     'memorisation.feature.overall.median_ratio',
                     'memorisation.pixel.overall.median_ratio',
                     'memorisation.feature.overall.nearest_real_same_class',
                     'cas.accuracy_mean', 'cas.balanced_accuracy_mean',
                     'cas.real_trained.accuracy_mean', 'cas.real_trained.balanced_accuracy_mean')
VERSION_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow',
                    'tensorflow-cpu', 'tensorflow-datasets', 'numpy', 'scipy', 'scikit-learn',
                    'matplotlib')
POOLING_NOTE = (
    'Pooled out-of-fold (OOF): the seed ensemble\'s test predictions of all folds of a repeat '
    'are concatenated (each image is tested once per repeat) and the metric is computed once '
    'on the pool; the 95% interval is a stratified bootstrap over images. With several '
    'repeats the value is the mean over repeats of the pooled metric, and every bootstrap '
    'resample of images is applied to all repeats at once, so repeats are not counted as new '
    'test images.')

REGIME_NOTE = ('Regimes: original = the real training images; trad = original with traditional '
               'augmentation; GAN = original topped up with GAN images; GAN+trad = both.')


class ReportError(ValueError):
  """The work directory cannot give a report; the message names the path."""


# ----------------------------------------------------------------------------- metrics


def _confusion(labels, preds, num_classes: int) -> np.ndarray:
  """[C, C] counts, rows = true class; np.bincount is ~100x faster than sklearn's here."""
  labels = np.asarray(labels, np.int64)
  preds = np.asarray(preds, np.int64)
  return np.bincount(labels * num_classes + preds,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(labels, preds, num_classes: int) -> float:
  del num_classes
  return float(np.mean(np.asarray(labels) == np.asarray(preds)))


def recalls(labels, preds, num_classes: int) -> np.ndarray:
  """[C] recall per class; NaN for a class absent from `labels`."""
  cm = _confusion(labels, preds, num_classes)
  support = cm.sum(axis=1)
  return np.divide(np.diag(cm), support, out=np.full(num_classes, np.nan), where=support > 0)


def balanced_accuracy(labels, preds, num_classes: int) -> float:
  """Mean recall over the classes present in `labels` (sklearn's definition)."""
  return float(np.nanmean(recalls(labels, preds, num_classes)))


def macro_f1(labels, preds, num_classes: int) -> float:
  """Mean F1 over classes present in labels or predictions (sklearn's macro default)."""
  cm = _confusion(labels, preds, num_classes)
  support, predicted = cm.sum(axis=1), cm.sum(axis=0)
  denom = support + predicted  # 2TP / (2TP + FP + FN) = 2TP / (support + predicted)
  f1 = np.divide(2 * np.diag(cm), denom, out=np.zeros(num_classes), where=denom > 0)
  return float(f1[denom > 0].mean())


METRICS: dict[str, Callable[[Any, Any, int], float]] = {
    'accuracy': accuracy, 'balanced_accuracy': balanced_accuracy, 'macro_f1': macro_f1}


# ----------------------------------------------------------------------------- pooling


def repeat_of(split_name: str) -> int:
  """The repeat index of a split: 'r1_k3' -> 1; a holdout (or other) split is repeat 0."""
  match = re.fullmatch(r'r(\d+)_k\d+', split_name)
  return int(match.group(1)) if match else 0


def pool_repeat(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]):
  """Concatenates the test predictions of the folds of one repeat.

  Args:
    parts: one (image_ids [N_k], labels [N_k], probs [N_k, C]) per fold; probs are the seed
      ensemble's.

  Returns:
    (image_ids [N], labels [N], probs [N, C]) sorted by image id, N = sum of N_k.

  Raises:
    ReportError: if an image is tested twice, which would make the pool not out-of-fold.
  """
  ids = np.concatenate([np.asarray(p[0]) for p in parts])
  labels = np.concatenate([np.asarray(p[1]) for p in parts])
  probs = np.concatenate([np.asarray(p[2], np.float64) for p in parts])
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ReportError(f'image ids tested more than once in one repeat: {unique[counts > 1][:10]}')
  order = np.argsort(ids, kind='stable')
  return ids[order], labels[order], probs[order]


def align_repeats(pools):
  """Stacks per-repeat pools over the same images.

  Args:
    pools: one (image_ids [N], labels [N], probs [N, C]) per repeat, each sorted by id.

  Returns:
    (image_ids [N], labels [N], preds [R, N], probs [R, N, C], note). When the repeats do not
    cover the same images (a run cut short by `split.max_splits`), only the first repeat is
    kept and `note` says so; otherwise note is ''.
  """
  ids, labels = pools[0][0], pools[0][1]
  same = all(np.array_equal(p[0], ids) and np.array_equal(p[1], labels) for p in pools[1:])
  note = ''
  if not same:
    pools, note = pools[:1], 'repeats cover different images; first repeat only'
  probs = np.stack([p[2] for p in pools])
  return ids, labels, probs.argmax(axis=-1), probs, note


def _over_repeats(metric, preds: np.ndarray, num_classes: int):
  """(labels, idx) -> the metric of every repeat on images idx, averaged over repeats."""
  def stat(labels, idx):
    return float(np.mean([metric(labels, p[idx], num_classes) for p in preds]))
  return stat


def pooled_estimate(labels, preds, metric, num_classes: int, *, n_boot: int,
                    seed: int) -> dict:
  """Pooled metric with a stratified bootstrap interval over images.

  Args:
    labels: [N] true classes of the pooled images.
    preds: [R, N] predicted classes, one row per repeat (R = 1 without repeats).
    metric: (labels, preds, num_classes) -> float.

  Returns:
    {point, low, high}: the mean over repeats and its 95% percentile interval; each resample
    of images is shared by all repeats.
  """
  preds = np.atleast_2d(preds)
  # stratified_bootstrap_ci resamples `preds` with `labels`; passing image indices lets one
  # resample select the same images in every repeat.
  point, low, high = stats.stratified_bootstrap_ci(
      labels, np.arange(len(labels)), _over_repeats(metric, preds, num_classes),
      n_boot=n_boot, seed=seed)
  return {'point': point, 'low': low, 'high': high}


def paired_difference(labels, preds_a, preds_b, metric, num_classes: int, *, n_boot: int,
                      seed: int) -> dict:
  """metric(a) - metric(b) on the same pooled images, with a paired stratified bootstrap.

  preds_a, preds_b: [R, N] predictions of two methods on the same images in the same order.
  """
  stat_a = _over_repeats(metric, np.atleast_2d(preds_a), num_classes)
  stat_b = _over_repeats(metric, np.atleast_2d(preds_b), num_classes)
  point, low, high = stats.stratified_bootstrap_ci(
      labels, np.arange(len(labels)), lambda y, idx: stat_a(y, idx) - stat_b(y, idx),
      n_boot=n_boot, seed=seed)
  return {'point': point, 'low': low, 'high': high}


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
  """One finished run directory WORKDIR/<view>/<split>/<regime>/<model>/."""
  view: str
  split: str
  regime: str
  model: str
  protocol: str
  path: str         # relative to the work directory
  results: dict

  @property
  def leaky(self) -> bool:
    return self.protocol == 'paper' or self.split.startswith('paper')

  def predictions(self, workdir: str) -> dict[str, np.ndarray]:
    path = os.path.join(workdir, self.path, 'predictions.npz')
    if not os.path.exists(path):
      raise ReportError(f'{path}: missing; the pooled out-of-fold metrics need every run\'s '
                        'test predictions.')
    with np.load(path) as z:
      missing = {'test_probs', 'test_labels', 'test_image_ids'} - set(z.files)
      if missing:
        raise ReportError(f'{path}: lacks {", ".join(sorted(missing))}.')
      return {k: z[k] for k in z.files}


def _run_protocol(run_dir: str, results: dict, workdir_config: dict) -> str:
  """The split protocol of a run: results.json, else the run's config.json, else the workdir's."""
  if 'protocol' in results:
    return str(results['protocol'])
  config_path = os.path.join(run_dir, 'config.json')
  config = utils.read_json(config_path) if os.path.exists(config_path) else workdir_config
  return str(config.get('split', {}).get('protocol', 'unknown'))


def find_runs(workdir: str) -> list[Run]:
  """Every completed run (one with results.json) under the work directory, in display order."""
  workdir_config = _read_config(workdir)
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, '*', '*', '*', '*', 'results.json'))):
    run_dir = os.path.dirname(path)
    view, split, regime_dir, model = os.path.relpath(run_dir, workdir).split(os.sep)
    if regime_dir.startswith('gan_') or regime_dir == 'measures':
      # A GAN's own classifier runs (gan_cond/cas/) and the feature extractor of the
      # synthetic-data measures (measures/feature_cnn/): not ablation cells.
      continue
    results = utils.read_json(path)
    runs.append(Run(view=results.get('view', view), split=results.get('split', split),
                    regime=results.get('regime', regime_dir.replace('_', '+')),
                    model=results.get('model', model),
                    protocol=_run_protocol(run_dir, results, workdir_config),
                    path=os.path.relpath(run_dir, workdir), results=results))
  return runs


def _read_config(workdir: str) -> dict:
  path = os.path.join(workdir, 'config.json')
  return utils.read_json(path) if os.path.exists(path) else {}


def _order(value, order: Sequence[str]):
  return (order.index(value) if value in order else len(order), value)


def cell_key(run: Run) -> tuple[str, str, str, str]:
  return (run.view, run.protocol, run.regime, run.model)


def _cell_sort_key(key):
  view, protocol, regime, model = key
  return (view, _order(protocol, PROTOCOL_ORDER), _order(model, MODEL_ORDER),
          _order(regime, REGIME_ORDER))


# ----------------------------------------------------------------------------- cells


def _mean_sd(values) -> dict:
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'sd': float(values.std(ddof=1)) if values.size > 1
          else 0.0, 'n': int(values.size)}


def _per_seed_summary(runs: Sequence[Run], class_names) -> dict:
  """Mean and SD over every (split, seed) of the per-seed test metrics in results.json."""
  per_seed = [m for r in runs for m in r.results['splits']['test']['per_seed']]
  summary = {k: _mean_sd([m[k] for m in per_seed]) for k in METRICS}
  summary['recall'] = {c: _mean_sd([m['per_class'][c]['recall'] for m in per_seed
                                    if m['per_class'][c]['support'] > 0])
                       for c in class_names
                       if any(m['per_class'][c]['support'] > 0 for m in per_seed)}
  return summary


def _pools(runs: Sequence[Run], workdir: str):
  """Per-repeat pools of ensemble test predictions and of majority-baseline predictions."""
  by_repeat: dict[int, list] = {}
  for run in runs:
    z = run.predictions(workdir)
    probs = metrics_lib.ensemble_probs(z['test_probs'])
    majority = np.full(len(z['test_labels']), run.results['majority_baseline']['majority_class'])
    by_repeat.setdefault(repeat_of(run.split), []).append(
        (z['test_image_ids'], z['test_labels'], probs, majority))
  model_pools, majority_pools = [], []
  for repeat in sorted(by_repeat):
    parts = by_repeat[repeat]
    num_classes = parts[0][2].shape[1]
    model_pools.append(pool_repeat([p[:3] for p in parts]))
    # The majority class goes through the same pooling as one-hot probabilities.
    majority_pools.append(pool_repeat(
        [(p[0], p[1], np.eye(num_classes)[p[3]]) for p in parts]))
  return align_repeats(model_pools), align_repeats(majority_pools)


def _paper_protocol_info(runs: Sequence[Run]) -> dict:
  """What the paper protocol's results.json adds: the synthetic share of the test split and
  the seed ensemble's metrics on its real test images alone (absent in older files)."""
  real = [r.results.get('test_by_source', {}).get('real') for r in runs]
  return {
      'test_synthetic_fraction': float(np.mean([r.results.get('test_synthetic_fraction', 0.0)
                                                for r in runs])),
      'real_test': None if any(x is None for x in real) else {
          k: float(np.mean([x['ensemble'][k] for x in real]))
          for k in ('accuracy', 'balanced_accuracy')},
  }


def summarize_cell(runs: Sequence[Run], workdir: str, *, n_boot: int, seed: int) -> dict:
  """Every number of one cell; see the module docstring."""
  first = runs[0]
  class_names = list(first.results['class_names'])
  num_classes = len(class_names)
  (ids, labels, preds, _, note), majority = _pools(runs, workdir)
  pooled = {k: pooled_estimate(labels, preds, fn, num_classes, n_boot=n_boot, seed=seed)
            for k, fn in METRICS.items()}
  pooled_recall = np.nanmean([recalls(labels, p, num_classes) for p in preds], axis=0)
  pooled['recall'] = {c: float(pooled_recall[i]) for i, c in enumerate(class_names)
                      if not np.isnan(pooled_recall[i])}
  _, m_labels, m_preds, _, _ = majority
  split_scores = {r.split: {k: r.results['splits']['test']['ensemble'][k] for k in METRICS}
                  for r in runs}
  return {
      'view': first.view, 'protocol': first.protocol, 'regime': first.regime,
      'model': first.model, 'leaky': first.leaky, 'class_names': class_names,
      'splits': sorted(r.split for r in runs), 'repeats': int(preds.shape[0]),
      'seeds': len(first.results['seeds']), 'pooled_n': int(len(labels)), 'pool_note': note,
      'n_train': float(np.mean([r.results['n_train_real'] for r in runs])),
      'n_synthetic': float(np.mean([r.results.get('n_train_extra', 0) for r in runs])),
      'n_test': float(np.mean([r.results['splits']['test']['ensemble']['n'] for r in runs])),
      'mean_sd': _per_seed_summary(runs, class_names),
      'pooled': pooled,
      'split_scores': split_scores,
      'majority': {
          'classes': sorted({class_names[r.results['majority_baseline']['majority_class']]
                             for r in runs}),
          'pooled': {k: METRICS[k](m_labels, m_preds[0], num_classes)
                     for k in ('accuracy', 'balanced_accuracy')},
          'mean_split': {k: float(np.mean([r.results['majority_baseline'][k] for r in runs]))
                         for k in ('accuracy', 'balanced_accuracy')},
      },
      'confusion_matrix': _confusion(labels, preds[0], num_classes).tolist(),
      'learning_curves': {r.split: f'{r.path}/learning_curves.png'.replace(os.sep, '/')
                          for r in sorted(runs, key=lambda r: r.split)},
      'train_seconds': float(sum(r.results.get('train_seconds', 0.0) for r in runs)),
      'paper_protocol': _paper_protocol_info(runs) if first.leaky else None,
      # Kept for the comparisons; not written to report.json.
      '_pool': (ids, labels, preds),
  }


# ----------------------------------------------------------------------------- comparisons


def _label(cell: dict) -> str:
  regime = REGIME_NAMES.get(cell['regime'], cell['regime'])
  model = MODEL_NAMES.get(cell['model'], cell['model'])
  return f'{regime} ({model})'


def comparison_pairs(cells: Sequence[dict]) -> list[tuple[dict, dict, str]]:
  """(a, b, kind) pairs within one view and protocol; a is the later regime or model."""
  pairs = []
  for (a, b) in itertools.combinations(cells, 2):
    if (a['view'], a['protocol']) != (b['view'], b['protocol']) or a['leaky'] or b['leaky']:
      continue
    if a['model'] == b['model']:
      kind, order, field = 'regime', REGIME_ORDER, 'regime'
    elif a['regime'] == b['regime']:
      kind, order, field = 'model', MODEL_ORDER, 'model'
    else:
      continue
    if _order(a[field], order) < _order(b[field], order):
      a, b = b, a
    pairs.append((a, b, kind))
  return sorted(pairs, key=_pair_key)


def _pair_key(pair):
  """Regime comparisons first (grouped by model), then model comparisons (by regime)."""
  a, b, kind = pair
  group = 'model' if kind == 'regime' else 'regime'
  orders = {'regime': REGIME_ORDER, 'model': MODEL_ORDER}
  return (a['view'], _order(a['protocol'], PROTOCOL_ORDER), kind != 'regime',
          _order(a[group], orders[group]), _order(b[kind], orders[kind]),
          _order(a[kind], orders[kind]))


def compare(a: dict, b: dict, kind: str, *, n_boot: int, seed: int) -> dict:
  """Corrected t-test on per-split scores, McNemar and a paired bootstrap on pooled OOF."""
  metric = COMPARISON_METRIC
  common = sorted(set(a['split_scores']) & set(b['split_scores']))
  result = {'view': a['view'], 'protocol': a['protocol'], 'kind': kind,
            'a': {'regime': a['regime'], 'model': a['model']},
            'b': {'regime': b['regime'], 'model': b['model']},
            'name_a': _label(a), 'name_b': _label(b), 'metric': metric, 'n_splits': len(common)}
  if len(common) >= 2:
    result['ttest'] = stats.corrected_resampled_ttest(
        [a['split_scores'][s][metric] for s in common],
        [b['split_scores'][s][metric] for s in common],
        n_train=int(round(a['n_train'])), n_test=int(round(a['n_test'])))
    result['ttest_note'] = ''
  else:
    result['ttest'] = None
    result['ttest_note'] = f'not defined with {len(common)} split(s)'
  ids_a, labels_a, preds_a = a['_pool']
  ids_b, _, preds_b = b['_pool']
  common_ids, ia, ib = np.intersect1d(ids_a, ids_b, return_indices=True)
  repeats = min(len(preds_a), len(preds_b))
  labels = labels_a[ia]
  pa, pb = preds_a[:repeats, ia], preds_b[:repeats, ib]
  result['pooled_n'] = int(len(common_ids))
  result['pooled_diff'] = paired_difference(labels, pa, pb, METRICS[metric],
                                            len(a['class_names']), n_boot=n_boot, seed=seed)
  result['mcnemar'] = stats.mcnemar_exact(labels, pa[0], pb[0])
  return result


def adjust_family(comparisons: list[dict]) -> None:
  """Holm over each (view, protocol) family, separately for the t-test and for McNemar."""
  families: dict[tuple, list[dict]] = {}
  for c in comparisons:
    families.setdefault((c['view'], c['protocol']), []).append(c)
  for family in families.values():
    with_t = [c for c in family if c['ttest'] is not None]
    for c, p in zip(with_t, stats.holm([c['ttest']['p'] for c in with_t])):
      c['ttest_p_holm'] = p
    for c, p in zip(family, stats.holm([c['mcnemar']['p'] for c in family])):
      c['mcnemar_p_holm'] = p
    for c in family:
      c['sentence'] = comparison_sentence(c)


def _p(p: float) -> str:
  return '< 0.001' if p < 0.001 else f'{p:.3f}'


def comparison_sentence(c: dict) -> str:
  """One line: the corrected t-test where defined, else the pooled bootstrap and McNemar."""
  metric_name = METRIC_NAMES[c['metric']]
  if c['ttest'] is not None:
    return stats.paired_difference_sentence(c['name_a'], c['name_b'], metric_name, c['ttest'],
                                            c['ttest_p_holm'])
  d = c['pooled_diff']
  p_adj = c['mcnemar_p_holm']
  if p_adj <= 0.05:
    verdict = f'significant at 0.05 ({c["name_a"] if d["point"] > 0 else c["name_b"]} is higher)'
  else:
    verdict = 'not significant at 0.05'
  return (f'{c["name_a"]} vs {c["name_b"]}: {100 * d["point"]:+.1f} points {metric_name} on the '
          f'pooled test images, 95% paired bootstrap CI [{100 * d["low"]:.1f}, '
          f'{100 * d["high"]:.1f}], exact McNemar p = {_p(c["mcnemar"]["p"])} (Holm-adjusted '
          f'{_p(p_adj)}): {verdict}. The corrected t-test is {c["ttest_note"]}.')


# ----------------------------------------------------------------------------- figures


def plot_pooled_scores(cells: Sequence[dict], path: str, *, metric: str = 'balanced_accuracy',
                       chance: float | None = None) -> None:
  """Point chart: the pooled OOF metric of each cell with its 95% interval, one row per cell."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7.5, 0.45 * len(cells) + 1.6), layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  y = np.arange(len(cells))[::-1]
  points = np.array([100 * c['pooled'][metric]['point'] for c in cells])
  lows = np.array([100 * c['pooled'][metric]['low'] for c in cells])
  highs = np.array([100 * c['pooled'][metric]['high'] for c in cells])
  ax.errorbar(points, y, xerr=[points - lows, highs - points], fmt='o', color='tab:blue',
              capsize=3, label='pooled OOF, 95% CI')
  majority = [100 * c['majority']['pooled'][metric] for c in cells]
  ax.scatter(majority, y, marker='|', s=200, color='tab:red', label='majority baseline')
  if chance is not None:
    ax.axvline(100 * chance, color='grey', linestyle=':', linewidth=1)
  ax.set_yticks(y, [f'{c["view"]} {c["protocol"]} | {_label(c)}' for c in cells])
  ax.set_xlabel(f'{METRIC_NAMES[metric]} (%)')
  ax.set_xlim(-1, 101)  # room for a marker at 0 or 100
  ax.grid(axis='x', alpha=0.3)
  ax.legend(loc='lower right', fontsize=8)
  # A figure title, not an axes title: the long row labels push the axes right, and a title
  # centred on the axes ran off the figure's right edge.
  fig.suptitle(f'Pooled {METRIC_NAMES[metric]} on held-out real images')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, format='png', dpi=120)
  fig.clear()


def _figure_name(cell: dict) -> str:
  return (f'confusion_{cell["view"]}_{cell["protocol"]}_{cell["regime"].replace("+", "_")}_'
          f'{cell["model"]}.png')


def write_figures(cells: Sequence[dict], report_dir: str) -> None:
  from wbc_jax import plots
  for cell in cells:
    path = os.path.join(report_dir, _figure_name(cell))
    title = f'{cell["view"]} {_label(cell)}: pooled OOF, seed ensemble'
    if cell['leaky']:
      title = 'LEAKY ' + title
    plots.plot_confusion_matrix(cell['confusion_matrix'], cell['class_names'], path, title=title)
    cell['figures'] = {'confusion': f'report/{_figure_name(cell)}'}
  honest = [c for c in cells if not c['leaky']]
  if honest:
    plot_pooled_scores(honest, os.path.join(report_dir, 'pooled_balanced_accuracy.png'))


# ----------------------------------------------------------------------------- GAN directories


def _flatten(obj, prefix=''):
  """Scalar leaves of a JSON object as (dotted key, value) pairs."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _flatten(v, f'{prefix}.{k}' if prefix else str(k))
  elif isinstance(obj, (int, float, str, bool)) or obj is None:
    yield prefix, obj


def find_gan_dirs(workdir: str) -> list[dict]:
  """GAN directories WORKDIR/<view>/<split>/gan_<kind>/: latest sample grid and measures."""
  found = []
  for gan_dir in sorted(glob.glob(os.path.join(workdir, '*', '*', 'gan_*'))):
    if not os.path.isdir(gan_dir):
      continue
    rel = os.path.relpath(gan_dir, workdir)
    samples = sorted(glob.glob(os.path.join(gan_dir, 'samples', '*.png')))
    measures_path = os.path.join(gan_dir, 'measures.json')
    measures, notes = None, []
    if os.path.exists(measures_path):
      try:
        raw = utils.read_json(measures_path)
      except (OSError, json.JSONDecodeError):
        raw = None  # being written by a running job: leave it out rather than fail
      if isinstance(raw, dict):
        measures = dict(_flatten(raw))
        notes = [str(n) for n in raw.get('notes', []) if isinstance(n, str)]
    figures = sorted(glob.glob(os.path.join(gan_dir, '*.png')))
    found.append({'dir': rel.replace(os.sep, '/'),
                  'samples': [os.path.relpath(s, workdir).replace(os.sep, '/')
                              for s in samples[-1:]],
                  'figures': [os.path.relpath(f, workdir).replace(os.sep, '/') for f in figures],
                  'measures_file': (os.path.relpath(measures_path, workdir).replace(os.sep, '/')
                                    if measures is not None else None),
                  'measures': measures, 'measure_notes': notes})
  return found


# ----------------------------------------------------------------------------- header


def software_versions() -> dict[str, str]:
  versions = {'python': platform.python_version()}
  for name in VERSION_PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def invocation() -> str:
  """The command line of this process, written as it would be typed."""
  argv = sys.argv
  if argv and argv[0].endswith(os.path.join('wbc_jax', 'main.py')):
    return shlex.join(['python', '-m', 'wbc_jax.main', *argv[1:]])
  return shlex.join(argv)


def _run_dates(workdir: str, runs: Sequence[Run]) -> tuple[str, str]:
  """First and last completion time of the runs (results.json is written last, UTC)."""
  times = [os.path.getmtime(os.path.join(workdir, r.path, 'results.json')) for r in runs]
  fmt = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  return fmt(min(times)), fmt(max(times))


def _command(report_dir: str, command: str | None) -> str | None:
  """The ablation's command: given by the caller (and recorded), else as recorded before."""
  path = os.path.join(report_dir, 'command.txt')
  if command:
    utils.write_atomic(path, command + '\n')
    return command
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip() or None
  return None


def header_info(workdir: str, report_dir: str, runs: Sequence[Run], command: str | None) -> dict:
  config = _read_config(workdir)
  first, last = _run_dates(workdir, runs)
  timing_path = os.path.join(workdir, 'timing.json')
  timing = dict(_flatten(utils.read_json(timing_path))) if os.path.exists(timing_path) else None
  return {
      'workdir': os.path.abspath(workdir),
      'command': _command(report_dir, command),
      'rebuild': shlex.join(['python', '-m', 'wbc_jax.report', f'--workdir={workdir}']),
      'config': {
          'protocol': config.get('split', {}).get('protocol'),
          'folds': config.get('split', {}).get('folds'),
          'repeats': config.get('split', {}).get('repeats'),
          'num_seeds': config.get('num_seeds'),
          'epochs': config.get('train', {}).get('epochs'),
          'gan_kind': config.get('gan', {}).get('kind'),
      },
      'versions': software_versions(),
      'machine': {'platform': platform.platform(), 'cpu_count': os.cpu_count()},
      'runs': {'count': len(runs), 'first_completed': first, 'last_completed': last,
               'train_seconds': float(sum(r.results.get('train_seconds', 0.0) for r in runs))},
      'timing': timing,
      'generated': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
  }


# ----------------------------------------------------------------------------- Markdown


def pct(x: float | None) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}'


def _mean_sd_text(d: dict) -> str:
  return f'{pct(d["mean"])} ± {pct(d["sd"])}'


def _ci_text(d: dict) -> str:
  return f'{pct(d["point"])} [{pct(d["low"])}, {pct(d["high"])}]'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  esc = lambda s: str(s).replace('|', '\\|')
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
  lines += ['| ' + ' | '.join(esc(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def _cell_rows(cells: Sequence[dict]) -> list[list[str]]:
  rows = []
  for c in cells:
    ms, po = c['mean_sd'], c['pooled']
    rows.append([
        c['view'], REGIME_NAMES.get(c['regime'], c['regime']),
        MODEL_NAMES.get(c['model'], c['model']),
        f'{len(c["splits"])} x {c["seeds"]}', str(c['pooled_n']),
        _mean_sd_text(ms['accuracy']), _mean_sd_text(ms['balanced_accuracy']),
        _mean_sd_text(ms['macro_f1']),
        _ci_text(po['accuracy']), _ci_text(po['balanced_accuracy']), _ci_text(po['macro_f1']),
        pct(c['majority']['pooled']['accuracy']),
        pct(c['majority']['pooled']['balanced_accuracy']),
    ])
  return rows


CELL_HEADERS = ('view', 'regime', 'model', 'splits x seeds', 'pooled n', 'acc (mean ± SD)',
                'bal. acc (mean ± SD)', 'macro-F1 (mean ± SD)', 'pooled acc [95% CI]',
                'pooled bal. acc [95% CI]', 'pooled macro-F1 [95% CI]', 'majority acc',
                'majority bal. acc')


def _groups(cells: Sequence[dict]):
  keyf = lambda c: (c['view'], c['protocol'])
  for key, group in itertools.groupby(cells, key=keyf):
    yield key, list(group)


def _section_header(info: dict, n_boot: int) -> str:
  cfg = info['config']
  lines = [
      '# Report', '',
      f'Built only from the files in `{info["workdir"]}`; rebuild without training with '
      f'`{info["rebuild"]}`. Every number below is also in '
      '[report/report.json](report/report.json).', '',
      '- Command: ' + (f'`{info["command"]}`' if info['command'] else
                       'not recorded (the report was built by hand); see the config.'),
      f'- Config: [config.json](config.json) (protocol {cfg["protocol"]}, folds {cfg["folds"]}, '
      f'repeats {cfg["repeats"]}, seeds {cfg["num_seeds"]}, epochs {cfg["epochs"]}, GAN '
      f'{cfg["gan_kind"]})',
      '- Software (the environment that built this report): ' + ', '.join(
          f'{k} {v}' for k, v in info['versions'].items()),
      f'- Machine: {info["machine"]["platform"]}, {info["machine"]["cpu_count"]} CPUs',
      f'- Runs: {info["runs"]["count"]}, completed {info["runs"]["first_completed"]} to '
      f'{info["runs"]["last_completed"]}; classifier training wall time '
      f'{utils.format_duration(info["runs"]["train_seconds"])} (the sum of the runs\' '
      'train_seconds; GAN training not included)',
  ]
  if info['timing']:
    lines.append('- Timing file (timing.json): ' + ', '.join(
        f'{k} {v}' for k, v in info['timing'].items()))
  lines += [f'- Report built {info["generated"]}; bootstrap resamples: {n_boot}', '']
  return '\n'.join(lines) + '\n'


def _section_results(cells: Sequence[dict]) -> str:
  honest = [c for c in cells if not c['leaky']]
  out = ['## Results on real held-out images', '',
         'Test images are real and were never seen in training, model selection or GAN '
         'training. "mean ± SD" is over every (split, seed) pair; "pooled" is the seed '
         'ensemble on the pooled out-of-fold test predictions. The majority baseline always '
         'predicts the most frequent training class ('
         + ', '.join(sorted({m for c in honest for m in c['majority']['classes']})) + ').', '',
         POOLING_NOTE, '', REGIME_NOTE, '']
  for (view, protocol), group in _groups(honest):
    out += [f'### {view} view, {protocol} protocol', '',
            _table(CELL_HEADERS, _cell_rows(group))]
    notes = [f'{_label(c)}: {c["pool_note"]}' for c in group if c['pool_note']]
    out += [f'Note: {n}.' for n in notes] + ([''] if notes else [])
  if honest:
    out += ['![pooled balanced accuracy](report/pooled_balanced_accuracy.png)', '']
  return '\n'.join(out) + '\n'


def _section_paper(cells: Sequence[dict]) -> str:
  honest = [c for c in cells if not c['leaky']]
  views = sorted({c['view'] for c in honest})
  headers = ['regime', 'model', f'paper test acc, {paper_results.CAVEAT}', 'paper test n']
  headers += [f'ours: {v} pooled acc [95% CI]' for v in views]
  headers += [f'ours: {v} pooled bal. acc [95% CI]' for v in views]
  rows = []
  for cell in paper_results.TABLE2:
    row = [REGIME_NAMES[cell.regime], MODEL_NAMES[cell.model],
           'not reported' if cell.accuracy is None else pct(cell.accuracy),
           '' if cell.n_test is None else str(cell.n_test)]
    for metric in ('accuracy', 'balanced_accuracy'):
      for view in views:
        match = [c for c in honest if (c['view'], c['regime'], c['model']) ==
                 (view, cell.regime, cell.model)]
        row.append(' / '.join(f'{_ci_text(c["pooled"][metric])} ({c["protocol"]})'
                              for c in match) or 'not run')
    rows.append(row)
  sources = [f'- {REGIME_NAMES[c.regime]} ({MODEL_NAMES[c.model]}): '
             f'`{c.path}` at {c.commit[:10]}: "{c.line}"' for c in paper_results.TABLE2]
  return '\n'.join([
      "## The paper's Table 2 beside ours", '',
      'The paper column is the test accuracy its notebooks print, ' + paper_results.CAVEAT
      + ': the GAN that drew them had seen the real test images, and the original-data regimes '
      'used one unstratified split of 56 images. Our columns are pooled out-of-fold values on '
      'real images only. The two are not comparable; they stand side by side to show the gap.',
      '',
      _table(headers, rows),
      f'Sources in github.com/{paper_results.REPOSITORY} (the printed line of each notebook):',
      *sources,
      f'- The repository README (at {paper_results.README_COMMIT[:10]}) says: '
      f'"{paper_results.README_BEST_LINE}"', '']) + '\n'


def _section_comparisons(comparisons: Sequence[dict]) -> str:
  if not comparisons:
    return ('## Comparisons\n\nNo two cells share a view and protocol with the same model or '
            'the same regime: nothing to compare.\n\n')
  headers = ['view', 'protocol', 'a', 'b', 'splits', 'mean diff (per split) [95% CI]',
             'corrected t-test p', 'Holm p (t)', 'pooled diff [95% CI]', 'McNemar b / c',
             'McNemar p', 'Holm p (McNemar)']
  rows = []
  for c in comparisons:
    t = c['ttest']
    rows.append([
        c['view'], c['protocol'], c['name_a'], c['name_b'], str(c['n_splits']),
        'not defined (one split)' if t is None else
        f'{100 * t["mean_diff"]:+.1f} [{100 * t["ci_low"]:.1f}, {100 * t["ci_high"]:.1f}]',
        'not defined (one split)' if t is None else _p(t['p']),
        'not defined' if t is None else _p(c['ttest_p_holm']),
        f'{100 * c["pooled_diff"]["point"]:+.1f} [{100 * c["pooled_diff"]["low"]:.1f}, '
        f'{100 * c["pooled_diff"]["high"]:.1f}]',
        f'{c["mcnemar"]["b"]} / {c["mcnemar"]["c"]}', _p(c['mcnemar']['p']),
        _p(c['mcnemar_p_holm'])])
  return '\n'.join([
      '## Comparisons', '',
      f'Differences are a minus b in points of {METRIC_NAMES[COMPARISON_METRIC]}. The '
      'corrected resampled t-test (Nadeau & Bengio) pairs the per-split seed-ensemble scores '
      '(n_train = real training images, n_test = test images of a split); it needs at least '
      'two splits. The pooled difference is a paired stratified bootstrap on the pooled OOF '
      'images; McNemar (exact) compares correctness on the first repeat\'s pool, b = a right '
      'and b wrong, c = the reverse. Holm adjusts each family (one view and protocol), '
      'separately for each test.', '',
      _table(headers, rows), *[f'- {c["sentence"]}' for c in comparisons], '']) + '\n'


def _section_recall(cells: Sequence[dict]) -> str:
  class_names = list(dict.fromkeys(n for c in cells for n in c['class_names']))
  rows = []
  for c in cells:
    row = [('LEAKY ' if c['leaky'] else '') + c['view'], c['protocol'],
           REGIME_NAMES.get(c['regime'], c['regime']), MODEL_NAMES.get(c['model'], c['model'])]
    for name in class_names:
      ms = c['mean_sd']['recall'].get(name)
      pooled = c['pooled']['recall'].get(name)
      row.append('absent' if ms is None else f'{_mean_sd_text(ms)} ({pct(pooled)})')
    rows.append(row)
  return '\n'.join([
      '## Recall per class', '',
      'Mean ± SD over (split, seed) pairs, with the pooled OOF seed-ensemble recall in '
      'parentheses.', '',
      _table(['view', 'protocol', 'regime', 'model', *class_names], rows)]) + '\n'


def _section_figures(cells: Sequence[dict], gans: Sequence[dict]) -> str:
  out = ['## Figures', '',
         'Pooled OOF confusion matrices of the seed ensemble (first repeat); learning curves '
         'are per run (mean over seeds, min-max band; the test curve is never used for '
         'selection).', '']
  for c in cells:
    tag = 'LEAKY ' if c['leaky'] else ''
    curves = ' · '.join(f'[{s}]({p})' for s, p in c['learning_curves'].items())
    out += [f'### {tag}{c["view"]}, {c["protocol"]}: {_label(c)}', '',
            f'![confusion matrix]({c["figures"]["confusion"]})', '',
            f'Learning curves: {curves}', '']
  if gans:
    out += ['## GANs', '',
            'Sample grids are synthetic images only (one row per class). Synthetic-data '
            'measures are shown where a measures.json exists.', '']
    for g in gans:
      out += [f'### {g["dir"]}', '']
      out += [f'![samples]({s})' for s in g['samples']] or ['No sample grid.']
      out.append('')
      if g['figures']:
        out += ['Figures (they show real cells beside synthetic ones, so they stay in the work '
                'directory and are left out of published copies of this report): '
                + ' · '.join(f'[{os.path.basename(f)}]({f})' for f in g['figures']), '']
      if g['measures']:
        shown = {k: v for k, v in g['measures'].items() if k in HEADLINE_MEASURES}
        if not shown:  # a layout this report does not know: show every scalar
          shown = g['measures']
        out.append(_table(['measure', 'value'], [[k, _format_value(v)] for k, v in shown.items()]))
        out += [f'- {n}' for n in g['measure_notes']]
        out += [f'All measures: [{g["measures_file"]}]({g["measures_file"]}).', '']
  return '\n'.join(out) + '\n'


def _format_value(v) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def _section_leaky(cells: Sequence[dict]) -> str:
  leaky = [c for c in cells if c['leaky']]
  if not leaky:
    return ''
  return '\n'.join([
      '## LEAKY: runs of the paper\'s protocol', '',
      'These runs follow the published pipeline: in its GAN regimes the split is drawn after '
      'synthetic images were mixed in, so their test images include synthetic ones made by a '
      'GAN that saw the real test images (the synthetic share is in the table; the '
      'non-GAN regimes of this protocol test on real images). They are here to reproduce the '
      'paper\'s numbers and are never compared with, or pooled into, the rows above.', '',
      _table(['LEAKY', *CELL_HEADERS, 'synthetic share of test', 'acc on real test (ensemble)',
              'bal. acc on real test (ensemble)'],
             [['LEAKY', *row, *_paper_columns(c)] for c, row in zip(leaky, _cell_rows(leaky))])
  ]) + '\n'


def _paper_columns(cell: dict) -> list[str]:
  info = cell['paper_protocol'] or {}
  real = info.get('real_test') or {}
  return [pct(info.get('test_synthetic_fraction')), pct(real.get('accuracy')),
          pct(real.get('balanced_accuracy'))]


def render_markdown(report: dict, cells: Sequence[dict]) -> str:
  return ''.join([
      _section_header(report['header'], report['n_boot']),
      _section_results(cells),
      _section_paper(cells),
      _section_comparisons(report['comparisons']),
      _section_recall(cells),
      _section_leaky(cells),
      _section_figures(cells, report['gans']),
  ])


# ----------------------------------------------------------------------------- entry points


def _public(cell: dict) -> dict:
  return {k: v for k, v in cell.items() if not k.startswith('_')}


def write_report(workdir: str, *, command: str | None = None, n_boot: int = 2000,
                 seed: int = 0, log: Callable = print) -> dict:
  """Builds DIR/REPORT.md, DIR/report/report.json and the figures; returns report.json's data.

  Raises:
    ReportError: if the work directory does not exist or holds no completed run.
  """
  if not os.path.isdir(workdir):
    raise ReportError(f'{workdir}: no such work directory.')
  runs = find_runs(workdir)
  if not runs:
    raise ReportError(f'{workdir}: no completed runs (no <view>/<split>/<regime>/<model>/'
                      'results.json); train first with python -m wbc_jax.main.')
  report_dir = os.path.join(workdir, 'report')
  os.makedirs(report_dir, exist_ok=True)
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    groups.setdefault(cell_key(run), []).append(run)
  cells = [summarize_cell(groups[k], workdir, n_boot=n_boot, seed=seed)
           for k in sorted(groups, key=_cell_sort_key)]
  comparisons = [compare(a, b, kind, n_boot=n_boot, seed=seed)
                 for a, b, kind in comparison_pairs(cells)]
  adjust_family(comparisons)
  write_figures(cells, report_dir)
  report = {
      'header': header_info(workdir, report_dir, runs, command),
      'n_boot': n_boot, 'seed': seed, 'pooling': POOLING_NOTE,
      'cells': [_public(c) for c in cells],
      'comparisons': comparisons,
      'paper': {'caveat': paper_results.CAVEAT, 'repository': paper_results.REPOSITORY,
                'readme_commit': paper_results.README_COMMIT,
                'readme_line': paper_results.README_BEST_LINE,
                'table2': [dataclasses.asdict(c) for c in paper_results.TABLE2]},
      'gans': find_gan_dirs(workdir),
  }
  utils.write_json(os.path.join(report_dir, 'report.json'), report)
  # Last, and atomically: a REPORT.md that exists is a complete one.
  utils.write_atomic(os.path.join(workdir, 'REPORT.md'), render_markdown(report, cells))
  log(f'report: {os.path.join(workdir, "REPORT.md")} ({len(cells)} cells, '
      f'{len(comparisons)} comparisons)')
  return report


def main(argv):
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from absl import flags
  f = flags.FLAGS
  try:
    write_report(f.workdir, n_boot=f.n_boot, seed=f.seed)
  except ReportError as e:
    raise SystemExit(f'wbc_jax.report: {e}') from None


def cli():
  from absl import app
  from absl import flags
  # Defined here, not at import: the ablation imports this module in the process whose
  # wbc_jax.main already defines --workdir.
  flags.DEFINE_string('workdir', None, 'Work directory of a finished (or partial) ablation.')
  flags.DEFINE_integer('n_boot', 2000, 'Bootstrap resamples per interval.')
  flags.DEFINE_integer('seed', 0, 'Seed of the bootstrap resampling.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)


if __name__ == '__main__':
  cli()
