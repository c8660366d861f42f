"""Classification metrics on the host: per-run numbers, seed ensembles, seed summaries.

Everything here takes numpy arrays (or anything `np.asarray` accepts) and returns plain Python
numbers, lists and dicts, so that results can be written straight to JSON and Markdown.
The metrics of probabilities come from `sklearn.metrics`; this module fixes which classes they
cover and how the seed axis is treated. The metrics of predicted classes (`METRICS`: accuracy,
balanced accuracy, macro-F1), which the report evaluates thousands of times in its bootstrap and
training once per epoch, are read off one confusion matrix counted with `np.bincount`; each
equals sklearn's number (tests/test_metrics_stats.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

# Probabilities are clipped before the log so that one confident mistake (or a one-hot input)
# gives a large but finite NLL instead of inf, which JSON cannot hold.
NLL_EPS = 1e-12


def classification_metrics(labels, probs, class_names: Sequence[str]) -> dict:
  """Metrics of one set of predictions.

  Args:
    labels: [N] int true classes in [0, C).
    probs: [N, C] class probabilities (or one-hot predictions); prediction = argmax.
    class_names: C names, in class-index order.

  Returns:
    A JSON-serialisable dict with
      n, accuracy,
      balanced_accuracy: mean recall over the classes present in `labels` (sklearn's
        definition), so a class missing from an evaluation split neither counts as 0 nor as 1,
      macro_f1: unweighted mean F1 over the classes present in `labels` or the predictions
        (sklearn's default), again so an absent class does not count as F1 = 0,
      per_class: {name: {precision, recall, f1, support}} for all C classes
        (0 where undefined),
      confusion_matrix: C x C list of lists, rows = true class, columns = predicted class,
        every class included even when absent,
      nll: mean negative log-likelihood of the true class.
  """
  labels = np.asarray(labels).astype(np.int64)
  probs = np.asarray(probs, dtype=np.float64)
  num_classes = len(class_names)
  if labels.ndim != 1 or probs.ndim != 2 or probs.shape != (labels.shape[0], num_classes):
    raise ValueError(
        f'expected labels [N] and probs [N, {num_classes}], got {labels.shape} and {probs.shape}')
  if labels.size == 0:
    raise ValueError('no examples to evaluate')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}')

  preds = probs.argmax(axis=1)
  all_classes = list(range(num_classes))
  precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels, preds, labels=all_classes, zero_division=0)
  cm = skm.confusion_matrix(labels, preds, labels=all_classes)
  true_probs = probs[np.arange(labels.size), labels]

  return {
      'n': int(labels.size),
      'accuracy': float(skm.accuracy_score(labels, preds)),
      # Not skm.balanced_accuracy_score: it warns whenever a prediction names a class absent
      # from `labels`, which is routine on small splits.
      'balanced_accuracy': balanced_accuracy(labels, preds, num_classes),
      'macro_f1': float(skm.f1_score(labels, preds, average='macro', zero_division=0)),
      'per_class': {
          name: {
              'precision': float(precision[i]),
              'recall': float(recall[i]),
              'f1': float(f1[i]),
              'support': int(support[i]),
          } for i, name in enumerate(class_names)
      },
      'confusion_matrix': cm.astype(int).tolist(),
      'nll': float(-np.mean(np.log(np.clip(true_probs, NLL_EPS, None)))),
  }


# ----------------------------------------------------------------------------- on classes
# Metrics of predicted classes, from one confusion matrix counted with np.bincount (~100x
# faster than sklearn's, which matters inside a bootstrap); each equals sklearn's number.


def confusion_counts(labels, preds, num_classes: int) -> np.ndarray:
  """[C, C] counts of labels [N] and preds [N] (ints), rows = true class."""
  labels = np.asarray(labels, np.int64)
  preds = np.asarray(preds, np.int64)
  return np.bincount(labels * num_classes + preds,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _num_classes(labels, preds, num_classes: int | None) -> int:
  if num_classes is not None:
    return num_classes
  return int(max(np.max(labels), np.max(preds))) + 1


def accuracy(labels, preds, num_classes: int | None = None) -> float:
  del num_classes  # the signature of the others, for METRICS
  return float(np.mean(np.asarray(labels) == np.asarray(preds)))


def recalls(labels, preds, num_classes: int) -> np.ndarray:
  """[C] recall per class; NaN for a class absent from `labels`."""
  cm = confusion_counts(labels, preds, num_classes)
  support = cm.sum(axis=1)
  return np.divide(np.diag(cm), support, out=np.full(num_classes, np.nan), where=support > 0)


def balanced_accuracy(labels, preds, num_classes: int | None = None) -> float:
  """Mean recall over the classes present in `labels` (sklearn's definition, as
  `classification_metrics`); num_classes defaults to the largest class seen + 1."""
  labels, preds = np.asarray(labels), np.asarray(preds)
  return float(np.nanmean(recalls(labels, preds, _num_classes(labels, preds, num_classes))))


def macro_f1(labels, preds, num_classes: int | None = None) -> float:
  """Mean F1 over classes present in labels or predictions (sklearn's macro default)."""
  labels, preds = np.asarray(labels), np.asarray(preds)
  num_classes = _num_classes(labels, preds, num_classes)
  cm = confusion_counts(labels, preds, num_classes)
  support, predicted = cm.sum(axis=1), cm.sum(axis=0)
  denom = support + predicted  # 2TP / (2TP + FP + FN) = 2TP / (support + predicted)
  f1 = np.divide(2 * np.diag(cm), denom, out=np.zeros(num_classes), where=denom > 0)
  return float(f1[denom > 0].mean())


# (labels [N], preds [N], num_classes) -> float, by name.
METRICS: dict[str, Callable[[Any, Any, int], float]] = {
    'accuracy': accuracy, 'balanced_accuracy': balanced_accuracy, 'macro_f1': macro_f1}


# ----------------------------------------------------------------------------- seeds


def ensemble_probs(probs) -> np.ndarray:
  """Seed ensemble: [S, N, C] per-seed probabilities -> [N, C] mean probabilities.

  The ensemble is the mean of probabilities, then one argmax; the mean of per-seed accuracies
  is a different (and usually lower) number and is reported by `summarize_seeds` instead.
  """
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim != 3:
    raise ValueError(f'expected probs [seeds, N, C], got shape {probs.shape}')
  return probs.mean(axis=0)


def summarize_seeds(
    per_seed: Sequence[Mapping],
    keys: Iterable[str] = ('accuracy', 'balanced_accuracy', 'macro_f1'),
) -> dict:
  """Spread of scalar metrics over seeds.

  Args:
    per_seed: one metrics dict per seed (e.g. from `classification_metrics`).
    keys: which scalar entries to summarise.

  Returns:
    {key: {values, mean, std, min, max}}; std is the sample standard deviation (ddof=1) when
    there are at least two seeds, and 0 for a single seed rather than NaN.
  """
  if not per_seed:
    raise ValueError('no seeds to summarise')
  summary = {}
  for key in keys:
    values = np.asarray([float(m[key]) for m in per_seed])
    summary[key] = {
        'values': values.tolist(),
        'mean': float(values.mean()),
        'std': float(values.std(ddof=1)) if values.size > 1 else 0.0,
        'min': float(values.min()),
        'max': float(values.max()),
    }
  return summary


def split_metrics(labels, probs, class_names: Sequence[str]) -> dict:
  """Metrics of every seed and of the seed ensemble on one split.

  labels [N], probs [S, N, C]. Returns {'per_seed': [S x `classification_metrics`],
  'seed_summary': `summarize_seeds` of those, 'ensemble': `classification_metrics` of the mean
  probability}.
  """
  per_seed = [classification_metrics(labels, p, class_names) for p in probs]
  return {
      'per_seed': per_seed,
      'seed_summary': summarize_seeds(per_seed),
      'ensemble': classification_metrics(labels, ensemble_probs(probs), class_names),
  }


def majority_baseline(
    train_labels,
    eval_labels,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict:
  """Metrics of always predicting the most frequent training class.

  The predicted probabilities are the training class frequencies: their argmax is the majority
  class (ties go to the lowest class index), so accuracy and F1 are those of the constant
  predictor, and the NLL is that of the class prior, a meaningful floor for a model's NLL.

  Args:
    train_labels: [N_train] int; only their class counts are used.
    eval_labels: [N_eval] int.
    num_classes: C.
    class_names: C names; defaults to '0', '1', ...

  Returns:
    `classification_metrics` output plus `majority_class` (the predicted class index).
  """
  train_labels = np.asarray(train_labels).astype(np.int64)
  eval_labels = np.asarray(eval_labels).astype(np.int64)
  if train_labels.size == 0:
    raise ValueError('no training labels')
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  counts = np.bincount(train_labels, minlength=num_classes)
  if counts.size != num_classes:
    raise ValueError(f'training labels exceed num_classes={num_classes}')
  prior = counts / counts.sum()
  probs = np.broadcast_to(prior, (eval_labels.size, num_classes))
  result = classification_metrics(eval_labels, probs, class_names)
  result['majority_class'] = int(np.argmax(counts))
  return result


def _format_cell(value, as_percent: bool) -> str:
  if value is None:
    return ''
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)) and not as_percent:
    return str(int(value))
  if isinstance(value, (float, int, np.floating, np.integer)):
    if as_percent:
      return f'{100.0 * float(value):.1f}'
    return f'{float(value):.3f}'
  # A pipe inside a cell would end the cell early.
  return str(value).replace('|', '\\|')


def format_markdown_table(
    rows: Sequence[Mapping],
    columns: Sequence[str],
    headers: Sequence[str] | None = None,
    percent_columns: Iterable[str] = (),
) -> str:
  """A plain Markdown (GitHub pipe) table.

  Args:
    rows: one dict per row; a missing key gives an empty cell.
    columns: the keys to show, in order.
    headers: column titles; defaults to `columns`.
    percent_columns: columns holding rates in [0, 1], printed as percentages with one decimal
      (0.8234 -> 82.3). Other floats get three decimals, integers and strings are printed as-is.

  Returns:
    The table, one line per row, ending with a newline.
  """
  if headers is None:
    headers = list(columns)
  if len(headers) != len(columns):
    raise ValueError(f'{len(headers)} headers for {len(columns)} columns')
  percent_columns = set(percent_columns)
  lines = [
      '| ' + ' | '.join(str(h) for h in headers) + ' |',
      '|' + '|'.join('---' for _ in columns) + '|',
  ]
  for row in rows:
    cells = [_format_cell(row.get(c), c in percent_columns) for c in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
