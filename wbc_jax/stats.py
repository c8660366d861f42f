"""Uncertainty and significance for comparing classifiers.

- `stratified_bootstrap_ci`: a confidence interval for one metric on one test set.
- `corrected_resampled_ttest`: compares two methods over repeated cross-validation folds,
  with the Nadeau & Bengio (2003) correction for the overlap between training sets
  (the plain paired t-test on CV folds is far too eager to call differences significant).
- `mcnemar_exact`: compares two methods' predictions on the same single test set.
- `holm`: adjusts a family of p-values for multiple comparisons.
- `paired_difference_sentence`: one line of plain English for a report.
- `pool_repeat`, `align_repeats`, `pooled_estimate`, `paired_difference`: pooled out-of-fold
  predictions over folds and repeats, and their bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats as sps


def stratified_bootstrap_indices(labels, rng: np.random.Generator) -> np.ndarray:
  """One stratified bootstrap resample: [N] indices into `labels`.

  Indices are drawn with replacement within each true class, so every resample has exactly the
  class counts of the original set; the interval then reflects sampling noise within classes,
  not random swings of the class mix (which would move balanced and unbalanced metrics apart).
  Classes are visited in sorted order, so the draw depends only on `labels` and `rng`.
  """
  labels = np.asarray(labels)
  parts = []
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    parts.append(rng.choice(members, size=members.size, replace=True))
  return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def stratified_bootstrap_ci(
    labels,
    preds,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
  """Point estimate and percentile bootstrap interval of `metric_fn(labels, preds)`.

  Args:
    labels: [N] true classes.
    preds: [N] predicted classes.
    metric_fn: (labels, preds) -> float, e.g. `sklearn.metrics.balanced_accuracy_score`.
    n_boot: number of stratified resamples.
    alpha: 1 - coverage; 0.05 gives a 95% interval.
    seed: seed of the numpy Generator; the same seed gives the same interval.

  Returns:
    (point, low, high): the metric on the full set and the alpha/2, 1 - alpha/2 percentiles of
    the metric over resamples.
  """
  labels = np.asarray(labels)
  preds = np.asarray(preds)
  if labels.shape != preds.shape or labels.ndim != 1:
    raise ValueError(f'labels and preds must both be [N], got {labels.shape} and {preds.shape}')
  if labels.size == 0:
    raise ValueError('no examples to bootstrap')
  rng = np.random.default_rng(seed)
  point = float(metric_fn(labels, preds))
  boot = np.empty(n_boot)
  for i in range(n_boot):
    idx = stratified_bootstrap_indices(labels, rng)
    boot[i] = metric_fn(labels[idx], preds[idx])
  low, high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return point, float(low), float(high)


def corrected_resampled_ttest(
    scores_a,
    scores_b,
    *,
    n_train: int,
    n_test: int,
) -> dict:
  """Nadeau & Bengio (2003) corrected resampled t-test on paired per-fold scores.

  With J = folds x repeats paired scores and d = a - b, the variance of mean(d) is taken as
  (1/J + n_test/n_train) * var(d) instead of var(d)/J: training sets of different folds overlap,
  so the fold scores are positively correlated and the naive variance is too small.

  Args:
    scores_a, scores_b: [J] scores of methods a and b on the same folds, in the same order.
    n_train, n_test: training and test set sizes of one fold.

  Returns:
    dict(mean_diff, t, p, df, ci_low, ci_high): p is two-sided with df = J - 1; the 95%
    interval of the mean difference uses the same corrected standard error. If every
    difference is zero, t = 0 and p = 1. If the differences are all equal and non-zero the
    standard error is zero: t = +/-inf and p = 0.

  Raises:
    ValueError: if the score vectors differ in length or J < 2.
  """
  a = np.asarray(scores_a, dtype=np.float64).ravel()
  b = np.asarray(scores_b, dtype=np.float64).ravel()
  if a.size != b.size:
    raise ValueError(f'paired scores differ in length: {a.size} vs {b.size}')
  if a.size < 2:
    raise ValueError(f'need at least 2 paired scores, got {a.size}')
  if n_train <= 0 or n_test <= 0:
    raise ValueError(f'n_train and n_test must be positive, got {n_train} and {n_test}')
  d = a - b
  j = d.size
  df = j - 1
  mean_diff = float(d.mean())
  se = float(np.sqrt((1.0 / j + n_test / n_train) * d.var(ddof=1)))
  if se == 0.0:
    t = 0.0 if mean_diff == 0.0 else float(np.copysign(np.inf, mean_diff))
    p = 1.0 if mean_diff == 0.0 else 0.0
    return dict(mean_diff=mean_diff, t=t, p=p, df=df, ci_low=mean_diff, ci_high=mean_diff)
  t = mean_diff / se
  p = float(2 * sps.t.sf(abs(t), df))
  half_width = float(sps.t.ppf(0.975, df)) * se
  return dict(mean_diff=mean_diff, t=float(t), p=p, df=df,
              ci_low=mean_diff - half_width, ci_high=mean_diff + half_width)


def mcnemar_exact(labels, preds_a, preds_b) -> dict:
  """Exact McNemar test of two classifiers on the same test set.

  Only the discordant examples carry information: b = a right and b wrong, c = a wrong and
  b right. Under the null each discordant example goes either way with probability 1/2, so
  the two-sided p-value is that of a binomial test of b successes in b + c trials.

  Returns:
    dict(b, c, p); p = 1 when the two classifiers never disagree on correctness.
  """
  labels = np.asarray(labels)
  preds_a = np.asarray(preds_a)
  preds_b = np.asarray(preds_b)
  if not labels.shape == preds_a.shape == preds_b.shape:
    raise ValueError(
        f'shapes differ: labels {labels.shape}, a {preds_a.shape}, b {preds_b.shape}')
  right_a = preds_a == labels
  right_b = preds_b == labels
  b = int(np.sum(right_a & ~right_b))
  c = int(np.sum(~right_a & right_b))
  p = 1.0 if b + c == 0 else float(sps.binomtest(b, b + c, 0.5).pvalue)
  return dict(b=b, c=c, p=p)


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values, in the order given.

  Sorted ascending, the k-th smallest (k = 0..m-1) is multiplied by m - k; a running maximum
  keeps the adjusted values in the same order as the raw ones, and they are clipped at 1.
  Rejecting where the adjusted p <= alpha controls the family-wise error rate at alpha.
  """
  p = np.asarray(pvalues, dtype=np.float64)
  m = p.size
  order = np.argsort(p, kind='stable')
  scaled = p[order] * (m - np.arange(m))
  adjusted_sorted = np.minimum(np.maximum.accumulate(scaled), 1.0)
  adjusted = np.empty(m)
  adjusted[order] = adjusted_sorted
  return adjusted.tolist()


def _format_p(p: float) -> str:
  if p < 0.001:
    return '< 0.001'
  if p < 0.01:
    return f'= {p:.3f}'
  return f'= {p:.2f}'


def paired_difference_sentence(
    name_a: str,
    name_b: str,
    metric_name: str,
    result: dict,
    p_adj: float,
    *,
    alpha: float = 0.05,
) -> str:
  """One sentence a reader can act on, from a `corrected_resampled_ttest` result.

  The metric is taken to be a rate in [0, 1] and is reported in percentage points, e.g.
  "GAN+trad vs trad (CNN-RNN): +3.2 points balanced accuracy, 95% CI [-1.0, 7.4],
  corrected t-test p = 0.21 (Holm-adjusted 0.63): not significant at 0.05."
  Significance is judged on the adjusted p-value.
  """
  diff = 100 * result['mean_diff']
  low = 100 * result['ci_low']
  high = 100 * result['ci_high']
  if p_adj <= alpha:
    better = name_a if diff > 0 else name_b
    verdict = f'significant at {alpha:g} ({better} is higher)'
  else:
    verdict = f'not significant at {alpha:g}'
  p_adj_text = _format_p(p_adj).removeprefix('= ')
  return (f'{name_a} vs {name_b}: {diff:+.1f} points {metric_name}, '
          f'95% CI [{low:.1f}, {high:.1f}], corrected t-test p {_format_p(result["p"])} '
          f'(Holm-adjusted {p_adj_text}): {verdict}.')


# ----------------------------------------------------------------------------- pooled predictions
# The test predictions of the folds of a repeat, concatenated: every image is tested exactly
# once per repeat. With several repeats (re-partitions of the same images) every bootstrap
# resample of images is applied to all repeats at once, so repeats do not count as new images.


def pool_repeat(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]):
  """Concatenates the test predictions of the folds of one repeat.

  Args:
    parts: one (image_ids [N_k], labels [N_k], probs [N_k, C]) per fold; probs are the seed
      ensemble's.

  Returns:
    (image_ids [N], labels [N], probs [N, C]) sorted by image id, N = sum of N_k.

  Raises:
    ValueError: if an image is tested twice, which would make the pool not out-of-fold.
  """
  ids = np.concatenate([np.asarray(p[0]) for p in parts])
  labels = np.concatenate([np.asarray(p[1]) for p in parts])
  probs = np.concatenate([np.asarray(p[2], np.float64) for p in parts])
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f'image ids tested more than once in one repeat: {unique[counts > 1][:10]}')
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
  point, low, high = stratified_bootstrap_ci(
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
  point, low, high = stratified_bootstrap_ci(
      labels, np.arange(len(labels)), lambda y, idx: stat_a(y, idx) - stat_b(y, idx),
      n_boot=n_boot, seed=seed)
  return {'point': point, 'low': low, 'high': high}
