"""Finished-looking ablation work directories written by hand, for the report's tests.

No training: each run's results.json and predictions.npz are computed from random
probabilities, so pooling, repeats, comparisons, the leaky section and the GAN section get
non-trivial numbers in milliseconds.
"""

import os

import numpy as np
from PIL import Image

from wbc_jax import metrics as metrics_lib
from wbc_jax import utils

CLASSES = ['EOSINOPHIL', 'LYMPHOCYTE', 'MONOCYTE', 'NEUTROPHIL']


def probs_with_skill(rng, labels, skill, seeds=2):
  """[seeds, N, 4] softmax probabilities whose argmax is right more often as skill grows."""
  logits = rng.normal(size=(seeds, len(labels), len(CLASSES)))
  logits[:, np.arange(len(labels)), labels] += skill
  e = np.exp(logits)
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def write_run(workdir, view, split, regime, model, *, ids, labels, train_labels, probs,
              protocol, extra=None):
  rdir = os.path.join(workdir, view, split, regime.replace('+', '_'), model)
  os.makedirs(rdir)
  per_seed = [metrics_lib.classification_metrics(labels, p, CLASSES) for p in probs]
  results = {
      'model': model, 'split': split, 'seeds': list(range(len(probs))),
      'n_train_real': len(train_labels), 'n_train_extra': 0, 'class_names': CLASSES,
      'train_seconds': 1.5, 'view': view, 'regime': regime,
      'splits': {'test': {
          'per_seed': per_seed, 'seed_summary': metrics_lib.summarize_seeds(per_seed),
          'ensemble': metrics_lib.classification_metrics(labels, probs.mean(0), CLASSES)}},
      'majority_baseline': metrics_lib.majority_baseline(train_labels, labels, 4, CLASSES),
  }
  results.update(extra or {})
  np.savez(os.path.join(rdir, 'predictions.npz'), test_probs=probs, test_labels=labels,
           test_image_ids=ids)
  utils.write_json(os.path.join(rdir, 'config.json'), {'split': {'protocol': protocol}})
  utils.write_json(os.path.join(rdir, 'results.json'), results)


def make_workdir(path, *, protocol='kfold', folds=3, repeats=2,
                 regimes=('original', 'original+gan'), models=('cnn', 'cnn_rnn'), seed=0):
  """A finished-looking ablation over 60 images (neutrophil the most frequent class)."""
  from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split
  labels = np.repeat([0, 1, 2, 3], [18, 10, 8, 24])
  ids = np.arange(1000, 1000 + len(labels))
  rng = np.random.default_rng(seed)
  if protocol == 'kfold':
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=0)
    splits = [(f'r{i // folds}_k{i % folds}', tr, te)
              for i, (tr, te) in enumerate(splitter.split(ids, labels))]
  else:
    tr, te = train_test_split(np.arange(len(ids)), test_size=0.3, stratify=labels,
                              random_state=0)
    splits = [('holdout', tr, te)]
  for name, tr, te in splits:
    for i, regime in enumerate(regimes):
      for j, model in enumerate(models):
        write_run(path, 'frame', name, regime, model, ids=ids[te], labels=labels[te],
                  train_labels=labels[tr],
                  probs=probs_with_skill(rng, labels[te], 0.3 + i + 0.6 * j), protocol=protocol)
  utils.write_json(os.path.join(path, 'config.json'), {
      'split': {'protocol': protocol, 'folds': folds, 'repeats': repeats}, 'num_seeds': 2,
      'train': {'epochs': 1}, 'gan': {'kind': 'cond'}})
  return str(path)


def make_kfold_workdir(path):
  """2 repeats x 3 folds, 2 regimes x 2 models, plus one LEAKY run and two GAN dirs."""
  workdir = make_workdir(path)
  rng = np.random.default_rng(1)
  labels = np.repeat([0, 1, 2, 3], [5, 5, 5, 5])
  write_run(workdir, 'frame', 'holdout', 'original+gan', 'cnn', ids=np.arange(20),
            labels=labels, train_labels=np.repeat([0, 1, 2, 3], [20, 20, 20, 30]),
            probs=probs_with_skill(rng, labels, 3.0), protocol='paper',
            extra={'protocol': 'paper', 'leaky': True, 'test_synthetic_fraction': 0.75,
                   'test_by_source': {'real': {'ensemble': {'accuracy': 0.4,
                                                            'balanced_accuracy': 0.3}}}})
  samples = os.path.join(workdir, 'frame', 'r0_k0', 'gan_cond', 'samples')
  os.makedirs(samples)
  Image.new('RGB', (8, 8)).save(os.path.join(samples, 'step_000002.png'))
  utils.write_json(os.path.join(workdir, 'frame', 'r0_k0', 'gan_cond', 'measures.json'),
                   {'kid': {'overall': {'mean': 0.012345}, 'per_class': {'MONOCYTE': 0.2}},
                    'notes': ['KID is unbiased.']})
  # A GAN's own classifier run (CAS) has a results.json too; it is not an ablation cell.
  cas = os.path.join(workdir, 'frame', 'r0_k0', 'gan_cond', 'cas')
  os.makedirs(cas)
  utils.write_json(os.path.join(cas, 'results.json'), {'model': 'cnn'})
  os.makedirs(os.path.join(workdir, 'frame', 'r0_k1', 'gan_cond'))
  with open(os.path.join(workdir, 'frame', 'r0_k1', 'gan_cond', 'measures.json'), 'w') as f:
    f.write('{"kid": ')  # half-written by a running job: skipped quietly
  return workdir
