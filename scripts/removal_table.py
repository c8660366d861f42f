r"""What each part of the strong baseline buys: a one-at-a-time removal table.

  python scripts/removal_table.py --full=workdirs/baseline_cv \
      --arm='per-box crop=workdirs/removal_box' --arm='48 px=workdirs/removal_48' ... \
      --out=experiments/baseline/removal.md

Every row is pooled over the folds of repeat 0 (each real image tested once) for seed 0
alone: the full recipe's row is seed 0 of the recorded cross-validation (`--full`), each
`--arm` a work directory trained with one part removed on the same folds and seed. Two rows
need no training: "no test-time augmentation" and "no weight averaging" are the same trained
seed evaluated without that part (`test_probs_no_tta`, `test_probs_no_ema` in its
predictions.npz). Each row gives the pooled accuracy, balanced accuracy and monocyte recall,
and the paired bootstrap difference in balanced accuracy against the full recipe.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wbc_jax import metrics  # noqa: E402
from wbc_jax import rundir  # noqa: E402
from wbc_jax import stats  # noqa: E402


MODEL = 'cellnet'  # the work directories may hold other models' runs (the floor) beside it


def _repeat0_runs(workdir: str, name: str) -> tuple[str, list[str]]:
  """The glob pattern and sorted paths of `name` in repeat 0's runs of the baseline's cell."""
  pattern = os.path.join(rundir.run_dir(workdir, 'crop', 'r0_k*', 'original+trad', MODEL), name)
  return pattern, sorted(glob.glob(pattern))


def pooled(workdir: str, key: str = 'test_probs', seed_index: int = 0):
  """(image_ids, labels, probs [N, C]) of repeat 0's folds; None if a fold is missing."""
  pattern, paths = _repeat0_runs(workdir, rundir.PREDICTIONS)
  if not paths:
    raise SystemExit(f'{workdir}: no finished fold of repeat 0 ({pattern}).')
  parts = []
  for path in paths:
    with np.load(path) as z:
      if key not in z:
        raise SystemExit(f'{path}: no {key}.')
      parts.append((z['test_image_ids'], z['test_labels'], z[key][seed_index]))
  return stats.pool_repeat(parts), len(paths)


def validation_means(workdir: str, seed_index: int = 0) -> dict[str, float]:
  """Mean over repeat 0's folds of the final validation accuracy and balanced accuracy.

  The validation images of different folds overlap (each is carved from that fold's
  training part), so they are averaged per fold rather than pooled. These are the figures a
  recipe decision may look at: selection never consults the test images.
  """
  _, paths = _repeat0_runs(workdir, rundir.RESULTS)
  per_fold = [json.load(open(p))['splits']['val']['per_seed'][seed_index] for p in paths]
  return {m: float(np.mean([f[m] for f in per_fold])) for m in ('accuracy', 'balanced_accuracy')}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--full', required=True, help='work directory of the full recipe (its r0 folds)')
  p.add_argument('--arm', action='append', default=[], help="'label=workdir' of one removal")
  p.add_argument('--out', required=True, help='markdown file to write (and .json beside it)')
  p.add_argument('--n_boot', type=int, default=2000)
  args = p.parse_args(argv)
  rows = [('full recipe', args.full, 'test_probs'),
          ('no test-time augmentation', args.full, 'test_probs_no_tta'),
          ('no weight averaging (raw final weights)', args.full, 'test_probs_no_ema')]
  for arm in args.arm:
    label, _, workdir = arm.partition('=')
    rows.append((label, workdir, 'test_probs'))
  (ids0, labels, probs0), folds0 = pooled(args.full)
  class_names = json.load(open(_repeat0_runs(args.full, rundir.RESULTS)[1][0]))['class_names']
  mono = class_names.index('MONOCYTE')
  full_preds = probs0.argmax(-1)[None]
  out, lines = [], []
  for label, workdir, key in rows:
    (ids, y, probs), folds = pooled(workdir, key)
    if folds != folds0 or not np.array_equal(ids, ids0) or not np.array_equal(y, labels):
      out.append({'label': label, 'workdir': workdir, 'incomplete': f'{folds} of {folds0} folds'})
      lines.append(f'| {label} | incomplete: {folds} of {folds0} folds | | | | |')
      continue
    preds = probs.argmax(-1)[None]
    est = {m: stats.pooled_estimate(labels, preds, metrics.METRICS[m], len(class_names),
                                    n_boot=args.n_boot, seed=0)
           for m in ('accuracy', 'balanced_accuracy')}
    recall = metrics.recalls(labels, preds[0], len(class_names))
    diff = stats.paired_difference(labels, preds, full_preds, metrics.balanced_accuracy,
                                   len(class_names), n_boot=args.n_boot, seed=0)
    # The no-TTA / no-EMA rows are the full recipe's trained seeds: their validation figures
    # were not computed without that part, so none is shown.
    val = validation_means(workdir) if key == 'test_probs' else None
    out.append({'label': label, 'workdir': workdir, 'key': key, **est, 'validation': val,
                'recall': dict(zip(class_names, recall.tolist())),
                'balanced_accuracy_minus_full': diff})
    ci = lambda d: f'{100 * d["point"]:.1f} [{100 * d["low"]:.1f}, {100 * d["high"]:.1f}]'
    delta = ('' if label == 'full recipe' else
             f'{100 * diff["point"]:+.1f} [{100 * diff["low"]:+.1f}, {100 * diff["high"]:+.1f}]')
    lines.append(f'| {label} | {ci(est["accuracy"])} | {ci(est["balanced_accuracy"])} | '
                 f'{100 * recall[mono]:.0f} | {delta} | ' +
                 (f'{100 * val["accuracy"]:.1f} / {100 * val["balanced_accuracy"]:.1f} |'
                  if val else 'not computed |'))
  n = len(labels)
  text = '\n'.join([
      '# What each part of the strong baseline buys', '',
      f'Repeat 0 of the 5-fold cross-validation, seed 0 alone, pooled over its {folds0} folds '
      f'({n} real test images, each once); 95% stratified bootstrap intervals ({args.n_boot} '
      'resamples); the last column is the paired difference in balanced accuracy against the '
      'full recipe. The last column is the final validation accuracy / balanced accuracy, '
      'averaged over the folds (36 images each; they overlap between folds): the figures a '
      'choice of recipe may look at. The test images decide nothing.', '',
      '| recipe | accuracy % | balanced accuracy % | monocyte recall % | bal. acc. vs full | '
      'validation acc. / bal. acc. % |',
      '| --- | --- | --- | ---: | --- | --- |', *lines, ''])
  print(text)
  with open(args.out, 'w') as f:
    f.write(text)
  with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
    json.dump(out, f, indent=2)


if __name__ == '__main__':
  main()
