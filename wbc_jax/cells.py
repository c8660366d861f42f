"""The report's numbers: finished runs grouped into cells, pooled, and compared.

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
on balanced accuracy; and across views, the located view against the crop view for the same
protocol, regime and model (the same test images, with and without the annotated box). Per-split paired scores go to the Nadeau-Bengio corrected resampled
t-test (undefined with one split); the pooled OOF predictions, aligned by image id, go to the
exact McNemar test and to a paired stratified bootstrap of the difference. Holm's correction
runs over each family (all comparisons of one view and protocol, separately per test).

Runs of the paper's leaky protocol (`split.protocol='paper'`, or a split named 'paper...')
are cells of their own, marked leaky, and never enter a comparison.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence

import numpy as np

from wbc_jax import metrics as metrics_lib
from wbc_jax import names
from wbc_jax import rundir
from wbc_jax import stats

PROTOCOL_ORDER = ('kfold', 'holdout', 'paper')
METRIC_NAMES = {'accuracy': 'accuracy', 'balanced_accuracy': 'balanced accuracy',
                'macro_f1': 'macro-F1'}
COMPARISON_METRIC = 'balanced_accuracy'
METRICS = metrics_lib.METRICS


def repeat_of(split_name: str) -> int:
  """The repeat index of a split: 'r1_k3' -> 1; a holdout (or other) split is repeat 0."""
  match = re.fullmatch(r'r(\d+)_k\d+', split_name)
  return int(match.group(1)) if match else 0


def order_key(value, order: Sequence[str]):
  """Sorts `value` by its place in `order`, unknown values last (by name)."""
  return (order.index(value) if value in order else len(order), value)


def cell_key(run: rundir.Run) -> tuple[str, str, str, str]:
  return (run.view, run.protocol, run.regime, run.model)


def cell_sort_key(key):
  view, protocol, regime, model = key
  return (view, order_key(protocol, PROTOCOL_ORDER), order_key(model, names.MODEL_NAMES),
          order_key(regime, names.REGIME_NAMES))


# ----------------------------------------------------------------------------- cells


def summarize_runs(runs: Sequence[rundir.Run], workdir: str, *, n_boot: int,
                   seed: int) -> tuple[list[dict], list[dict]]:
  """The cells of `runs` in the report's order, and their comparisons (Holm-adjusted)."""
  groups: dict[tuple, list[rundir.Run]] = {}
  for run in runs:
    groups.setdefault(cell_key(run), []).append(run)
  cells = [summarize_cell(groups[k], workdir, n_boot=n_boot, seed=seed)
           for k in sorted(groups, key=cell_sort_key)]
  comparisons = [compare(a, b, kind, n_boot=n_boot, seed=seed)
                 for a, b, kind in comparison_pairs(cells)]
  adjust_family(comparisons)
  return cells, comparisons


def _mean_sd(values) -> dict:
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'sd': float(values.std(ddof=1)) if values.size > 1
          else 0.0, 'n': int(values.size)}


def _per_seed_summary(runs: Sequence[rundir.Run], class_names) -> dict:
  """Mean and SD over every (split, seed) of the per-seed test metrics in results.json."""
  per_seed = [m for r in runs for m in r.results['splits']['test']['per_seed']]
  summary = {k: _mean_sd([m[k] for m in per_seed]) for k in METRICS}
  summary['recall'] = {c: _mean_sd([m['per_class'][c]['recall'] for m in per_seed
                                    if m['per_class'][c]['support'] > 0])
                       for c in class_names
                       if any(m['per_class'][c]['support'] > 0 for m in per_seed)}
  return summary


def _pools(runs: Sequence[rundir.Run], workdir: str):
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
    model_pools.append(stats.pool_repeat([p[:3] for p in parts]))
    # The majority class goes through the same pooling as one-hot probabilities.
    majority_pools.append(stats.pool_repeat(
        [(p[0], p[1], np.eye(num_classes)[p[3]]) for p in parts]))
  return stats.align_repeats(model_pools), stats.align_repeats(majority_pools)


def _paper_protocol_info(runs: Sequence[rundir.Run]) -> dict:
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


def summarize_cell(runs: Sequence[rundir.Run], workdir: str, *, n_boot: int, seed: int) -> dict:
  """Every number of one cell; see the module docstring."""
  first = runs[0]
  class_names = list(first.results['class_names'])
  num_classes = len(class_names)
  (ids, labels, preds, _, note), majority = _pools(runs, workdir)
  pooled = {k: stats.pooled_estimate(labels, preds, fn, num_classes, n_boot=n_boot, seed=seed)
            for k, fn in METRICS.items()}
  pooled_recall = np.nanmean([metrics_lib.recalls(labels, p, num_classes) for p in preds],
                             axis=0)
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
      'confusion_matrix': metrics_lib.confusion_counts(labels, preds[0], num_classes).tolist(),
      'learning_curves': {r.split: f'{r.path}/learning_curves.png'.replace(os.sep, '/')
                          for r in sorted(runs, key=lambda r: r.split)},
      'train_seconds': float(sum(r.results.get('train_seconds', 0.0) for r in runs)),
      'paper_protocol': _paper_protocol_info(runs) if first.leaky else None,
      # Kept for the comparisons; not written to report.json.
      '_pool': (ids, labels, preds),
  }


# ----------------------------------------------------------------------------- comparisons


def label(cell: dict) -> str:
  regime = names.REGIME_LABELS.get(cell['regime'], cell['regime'])
  model = names.MODEL_LABELS.get(cell['model'], cell['model'])
  return f'{regime} ({model})'


# Views tested on the same images, compared cell by cell: (a, b) = (located, crop) asks what
# finding the cell costs against its annotated box (`wbc_jax.located`).
PAIRED_VIEWS = (('located', 'crop'),)


def comparison_pairs(cells: Sequence[dict]) -> list[tuple[dict, dict, str]]:
  """(a, b, kind) pairs within one view and protocol, a the later regime or model; and
  (located, crop) pairs of the same protocol, regime and model (kind 'view')."""
  pairs = []
  for (a, b) in itertools.combinations(cells, 2):
    if a['leaky'] or b['leaky']:
      continue
    same = lambda *fields: all(a[f] == b[f] for f in fields)
    if not same('view') and same('protocol', 'regime', 'model'):
      for views in PAIRED_VIEWS:
        if {a['view'], b['view']} == set(views):
          pairs.append((a, b, 'view') if a['view'] == views[0] else (b, a, 'view'))
      continue
    if not same('view', 'protocol'):
      continue
    if a['model'] == b['model']:
      kind, order, field = 'regime', names.REGIME_NAMES, 'regime'
    elif a['regime'] == b['regime']:
      kind, order, field = 'model', names.MODEL_NAMES, 'model'
    else:
      continue
    if order_key(a[field], order) < order_key(b[field], order):
      a, b = b, a
    pairs.append((a, b, kind))
  return sorted(pairs, key=_pair_key)


def _pair_key(pair):
  """Regime comparisons first (grouped by model), then model comparisons (by regime)."""
  a, b, kind = pair
  if kind == 'view':
    return (a['view'], order_key(a['protocol'], PROTOCOL_ORDER), 2,
            order_key(a['regime'], names.REGIME_NAMES), order_key(a['model'], names.MODEL_NAMES),
            ('', 0), ('', 0))
  group = 'model' if kind == 'regime' else 'regime'
  orders = {'regime': names.REGIME_NAMES, 'model': names.MODEL_NAMES}
  return (a['view'], order_key(a['protocol'], PROTOCOL_ORDER), int(kind != 'regime'),
          order_key(a[group], orders[group]), order_key(b[kind], orders[kind]),
          order_key(a[kind], orders[kind]), ('', 0))


def compare(a: dict, b: dict, kind: str, *, n_boot: int, seed: int) -> dict:
  """Corrected t-test on per-split scores, McNemar and a paired bootstrap on pooled OOF."""
  metric = COMPARISON_METRIC
  common = sorted(set(a['split_scores']) & set(b['split_scores']))
  result = {'view': a['view'], 'protocol': a['protocol'], 'kind': kind,
            'a': {'regime': a['regime'], 'model': a['model']},
            'b': {'regime': b['regime'], 'model': b['model']},
            'name_a': label(a), 'name_b': label(b), 'metric': metric, 'n_splits': len(common)}
  if kind == 'view':
    result.update(name_a=f'{label(a)}, {a["view"]}', name_b=f'{label(b)}, {b["view"]}')
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
  result['pooled_diff'] = stats.paired_difference(labels, pa, pb, METRICS[metric],
                                                  len(a['class_names']), n_boot=n_boot,
                                                  seed=seed)
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


def format_p(p: float) -> str:
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
          f'{100 * d["high"]:.1f}], exact McNemar p = {format_p(c["mcnemar"]["p"])} '
          f'(Holm-adjusted {format_p(p_adj)}): {verdict}. The corrected t-test is '
          f'{c["ttest_note"]}.')
