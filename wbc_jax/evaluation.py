"""Evaluating a classifier's seeds, and choosing each seed's parameters on validation.

Exact evaluation: no shuffling, the last batch padded and its padding masked out on the
host, probabilities [S, N, C] of every seed for every image once; metrics are computed once
on the whole set, per seed and for the seed ensemble (`metrics.split_metrics`).

Model selection (`config.train.select`): per seed, the evaluated parameters of the epoch with
the best validation accuracy (the first such epoch on ties) are kept in the state and are the
ones tested ('val_accuracy', the paper's); or the best validation balanced accuracy, or the
lowest validation loss; or 'last', a fixed schedule evaluated at its end. Selection never
looks at the test images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wbc_jax import input_pipeline as ip
from wbc_jax import metrics as metrics_lib
from wbc_jax import sharding

PyTree = Any
SELECTIONS = ('val_accuracy', 'val_balanced_accuracy', 'val_loss', 'last')
# (images uint8 [N, H, W, 3], labels [N]) by name, e.g. {'val': ..., 'test': ...}.
Sets = Mapping[str, tuple[np.ndarray, np.ndarray]]


def predict_probs(predict: Callable, params: PyTree, batch_stats: PyTree, images: np.ndarray,
                  batch_size: int, norm: tuple[jax.Array, jax.Array]) -> np.ndarray:
  """Exact masked evaluation: probabilities [S, N, C] of every example, once each.

  norm: the state's `predict_consts` ([S, 3], [S, 3], [S, C]). The padded rows of the last batch are
  dropped by the mask on the host, after the probabilities are gathered whole: the count
  never depends on the mesh.
  """
  outs = []
  for batch in ip.eval_batches(images, np.zeros(len(images), np.int32), batch_size):
    probs = predict(params, batch_stats, batch['image'], norm)
    outs.append(sharding.to_host(probs)[:, batch['mask']])
  return np.concatenate(outs, axis=1)


def nll(labels, probs) -> np.ndarray:
  """Mean NLL per seed. probs [S, N, C] -> [S]."""
  p = np.take_along_axis(probs, np.asarray(labels)[None, :, None], axis=-1)[..., 0]
  return -np.log(np.clip(p, 1e-12, 1.0)).mean(axis=1)


def curve_metrics(predict: Callable, params: PyTree, batch_stats: PyTree, norm, sets: Sets, *,
                  batch_size: int, num_classes: int) -> dict[str, list[float]]:
  """One epoch's evaluation for the curves: per set, '<set>_loss' (NLL), '<set>_acc' and
  '<set>_bacc' (balanced accuracy), each a list over the seeds."""
  row = {}
  for name, (x, y) in sets.items():
    probs = predict_probs(predict, params, batch_stats, x, batch_size, norm)
    row[f'{name}_loss'] = nll(y, probs).tolist()
    row[f'{name}_acc'] = (probs.argmax(-1) == y[None]).mean(axis=1).tolist()
    row[f'{name}_bacc'] = [metrics_lib.balanced_accuracy(y, p.argmax(-1), num_classes)
                           for p in probs]
  return row


def evaluate_sets(predict: Callable, params: PyTree, batch_stats: PyTree, norm, sets: Sets, *,
                  batch_size: int, class_names: Sequence[str]) -> tuple[dict, dict]:
  """({set: `metrics.split_metrics`}, {set: probabilities [S, N, C]}) of each set, in order."""
  metrics, probs = {}, {}
  for name, (x, y) in sets.items():
    probs[name] = predict_probs(predict, params, batch_stats, x, batch_size, norm)
    metrics[name] = metrics_lib.split_metrics(y, probs[name], class_names)
  return metrics, probs


def evaluate_selected(predict: Callable, state, sets: Sets, variants: Mapping[str, tuple], *,
                      batch_size: int, class_names: Sequence[str],
                      image_ids: Mapping[str, np.ndarray]) -> tuple[dict, dict, dict]:
  """The final evaluation of each seed's selected parameters (state.best_*).

  sets: {'train', 'val', 'test'}; variants: {name: (predict, params, batch_stats)}, other
  parameters or programs of the same seeds, evaluated on the test set only; image_ids: of the
  val and test sets. Returns results.json's 'splits' and 'test_variants', and the arrays of
  predictions.npz (val/test probabilities [S, N, C], labels and image ids, and each variant's
  test probabilities).
  """
  splits, probs = evaluate_sets(predict, state.best_params, state.best_batch_stats,
                                state.predict_consts, sets, batch_size=batch_size,
                                class_names=class_names)
  arrays = {}
  for name in ('val', 'test'):
    arrays.update({f'{name}_probs': probs[name], f'{name}_labels': sets[name][1],
                   f'{name}_image_ids': image_ids[name]})
  test_variants = {}
  for name, (variant_predict, params, batch_stats) in variants.items():
    metrics, probs = evaluate_sets(variant_predict, params, batch_stats, state.predict_consts,
                                   {'test': sets['test']}, batch_size=batch_size,
                                   class_names=class_names)
    test_variants[name] = metrics['test']
    arrays[f'test_probs_{name}'] = probs['test']
  return splits, test_variants, arrays


def select_best(state, score: jax.Array):
  """Keeps the evaluated parameters (`train.TrainState.eval_variables`) of this epoch where
  the selection score (higher is better) improved; the first best epoch on ties (one seed)."""
  better = score > state.best_score
  pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(better, a, b), new, old)
  params, batch_stats = state.eval_variables()
  return state.replace(
      best_params=pick(params, state.best_params),
      best_batch_stats=pick(batch_stats, state.best_batch_stats),
      best_score=jnp.where(better, score, state.best_score),
      best_epoch=jnp.where(better, state.epoch, state.best_epoch))


def selection_score(select: str, row: dict) -> np.ndarray:
  """The per-seed score [S] that `select_best` maximises, from one epoch's metrics row."""
  if select not in SELECTIONS:
    raise ValueError(f"config.train.select: unknown rule {select!r}; expected one of "
                     f"{', '.join(SELECTIONS)}.")
  if select == 'last':
    return np.full(len(row['val_acc']), float(row['epoch']), np.float32)
  key = {'val_accuracy': 'val_acc', 'val_balanced_accuracy': 'val_bacc'}.get(select)
  score = np.asarray(row[key]) if key else -np.asarray(row['val_loss'])
  return score.astype(np.float32)
