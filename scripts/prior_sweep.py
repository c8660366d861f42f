r"""Choosing the prior correction (`config.train.prior_correction`) on validation images only.

  python scripts/prior_sweep.py --workdir=workdirs/baseline_cv3 \
      --out=experiments/baseline/prior.md

A model trained on class-balanced batches predicts as if every class were equally common;
`prior_correction = tau` multiplies its probabilities by (training prior) ** tau. This script
takes a finished cross-validation run trained without it, applies each tau of a grid to the
saved VALIDATION probabilities of every split (per seed, then the seed ensemble, as
`wbc_jax.train.predict_step` and the report do), pools the validation images of all splits,
and picks the tau with the highest pooled validation accuracy (the smaller tau on ties). The
test probabilities are never read.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wbc_jax import metrics  # noqa: E402
from wbc_jax import rundir  # noqa: E402
from wbc_jax import utils  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run (e.g. configs/baseline.py:cv).')
_MODEL = flags.DEFINE_string('model', 'cellnet', 'The model whose runs are swept.')
_TAUS = flags.DEFINE_list('taus', ['0', '0.125', '0.25', '0.375', '0.5', '0.75', '1'],
                          'The grid of tau values.')
_OUT = flags.DEFINE_string('out', None, 'Markdown table to write (a .json beside it).')


def corrected(probs: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
  """probs [S, N, C] times prior [C] ** tau, renormalised per row."""
  p = probs * prior ** tau
  return p / p.sum(axis=-1, keepdims=True)


def sweep(workdir: str, model: str, taus: list[float]) -> dict:
  pattern = os.path.join(rundir.run_dir(workdir, '*', '*', '*', model), 'predictions.npz')
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise FileNotFoundError(f'{pattern}: no finished runs of {model!r} in {workdir}.')
  rows, labels, class_names = {t: [] for t in taus}, [], None
  for path in paths:
    results = utils.read_json(os.path.join(os.path.dirname(path), 'results.json'))
    if results.get('prior_correction', 0.0) or results.get('fit_on', 'train') != 'train':
      raise ValueError(f'{path}: trained with a prior correction or on its validation '
                       'images; the sweep needs runs without either.')
    class_names = results['class_names']
    # The training labels' class counts: the rows of the training confusion matrix.
    counts = np.asarray(results['splits']['train']['ensemble']['confusion_matrix']).sum(1)
    prior = counts / counts.sum()
    with np.load(path) as d:
      val_probs, val_labels = d['val_probs'], d['val_labels']
    labels.append(val_labels)
    for t in taus:
      rows[t].append(metrics.ensemble_probs(corrected(val_probs, prior, t)).argmax(-1))
  y = np.concatenate(labels)
  nc = len(class_names)
  table = []
  for t in taus:
    pred = np.concatenate(rows[t])
    rec = metrics.recalls(y, pred, nc)
    table.append({'tau': t, 'accuracy': metrics.accuracy(y, pred, nc),
                  'balanced_accuracy': metrics.balanced_accuracy(y, pred, nc),
                  'recall': dict(zip(class_names, rec.tolist()))})
  best = max(table, key=lambda r: (r['accuracy'], -r['tau']))
  return {'workdir': workdir, 'model': model, 'runs': len(paths), 'n_val_pooled': int(len(y)),
          'class_names': class_names, 'rows': table, 'chosen_tau': best['tau']}


def to_markdown(s: dict) -> str:
  names = s['class_names']
  out = ['# The prior correction, chosen on validation',
         '',
         f"Validation images of {s['runs']} runs of `{s['model']}` in `{s['workdir']}` pooled "
         f"({s['n_val_pooled']} images; the validation sets of the folds overlap). Each tau "
         'multiplies every seed\'s probabilities by (training prior) ** tau before the seed '
         'ensemble. The rule: the highest pooled validation accuracy, the smaller tau on ties. '
         'Test images are not read.',
         '',
         '| tau | validation accuracy % | validation balanced accuracy % | '
         + ' | '.join(f'{n.lower()} recall %' for n in names) + ' |',
         '|' + '---:|' * (3 + len(names))]
  for r in s['rows']:
    mark = ' (chosen)' if r['tau'] == s['chosen_tau'] else ''
    out.append(f"| {r['tau']:g}{mark} | {100 * r['accuracy']:.1f} | "
               f"{100 * r['balanced_accuracy']:.1f} | "
               + ' | '.join(f"{100 * r['recall'][n]:.1f}" for n in names) + ' |')
  out += ['', f"Chosen: tau = {s['chosen_tau']:g} (`config.train.prior_correction`).", '']
  return '\n'.join(out)


def main(argv):
  del argv
  s = sweep(_WORKDIR.value, _MODEL.value, [float(t) for t in _TAUS.value])
  text = to_markdown(s)
  print(text)
  if _OUT.value:
    utils.write_atomic(_OUT.value, text)
    utils.write_atomic(os.path.splitext(_OUT.value)[0] + '.json', json.dumps(s, indent=2))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
