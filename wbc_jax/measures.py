r"""Measures of synthetic images: KID, FID, Classification Accuracy Score, memorisation.

  python -m wbc_jax.measures --workdir=WORKDIR

measures every WORKDIR/<view>/<split>/gan_<kind>/synthetic.npz of an ablation that has no
measures.json beside it yet (the ablation does the same at its end with
`--config.synthetic.measures=True`). Per GAN it writes, in its directory:

  measures.json          written atomically, last: its presence marks the GAN measured
  real_vs_synthetic.png  a row per class: real training images, a gap, synthetic ones
  closest_pairs_pixel.png, closest_pairs_feature.png
                         the synthetic images closest to a real training image (top row),
                         above their nearest real image
  cas/                   the run of the Classification Accuracy Score
The PNGs show real cells: they stay in the work directory.

Real images are those the GAN was trained on: the split's training images (every image
of the view for the paper protocol). Features are the penultimate layer (the Dense-128
ReLU output of `ClassifierHead`) of the CNN trained on the same images: seed 0's
validation-selected parameters of the 'original' regime's 'cnn' run of the same (view,
split), or, when that run is absent, of a run trained for this in
WORKDIR/<view>/<split>/measures/feature_cnn. Such a network saw a few hundred images, so
its features are a small, task-specific space, not Inception's: the distances compare
GANs and splits within this project, not with published FID or KID values.

  KID  unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, mean
       and standard deviation over random subsets of equal size (Binkowski et al. 2018).
       Unbiased at any size; the one to read here.
  FID  Frechet distance between Gaussians fitted to the two feature sets (Heusel et al.
       2017). With 14-150 real images per class and 128 features the covariances are
       rank-deficient and FID is strongly biased upwards; reported for completeness.
  CAS  a classifier trained on the synthetic images only (the CNN, with the run's
       training config; model selection on the real validation images), tested on the
       split's real test images (Ravuri & Vinyals 2019).
  memorisation  for each synthetic image the distance to its nearest real training image
       (features: Euclidean; pixels: root mean square difference in [0, 1]), beside the
       same distance of each real training image to its nearest other real training
       image (leave one out). Synthetic images much closer to a real one than real
       images are to each other suggest copies.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from typing import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import scipy.linalg
from scipy.spatial import distance

from wbc_jax import input_pipeline as ip
from wbc_jax import plots
from wbc_jax import rundir
from wbc_jax import train
from wbc_jax import utils

# The module path of the penultimate Dense layer (before its ReLU) in the paper's models.
PENULTIMATE = ('ClassifierHead_0', 'Dense_0')
FEATURE_MODEL = 'cnn'
FID_NOTE = ('FID is strongly biased at this size (14-150 real images per class against 128 '
            'features: rank-deficient covariances) and is reported for completeness; read KID, '
            'which is unbiased.')
MIXTURE_NOTE = ("The 'overall' values compare the real training set with the synthetic set as "
                'generated, whose classes were topped up, so their class proportions differ; '
                'the per-class values are the cleaner comparison.')


# ----------------------------------------------------------------------------- distances


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x, y) = (x.y / d + 1)^3 for x [n, d], y [m, d] -> [n, m]."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 with `polynomial_kernel` between x [n, d] and y [m, d]; n, m >= 2.

  The within-set sums leave out k(x_i, x_i), which makes the estimate unbiased (it can
  be slightly negative when the two distributions are equal).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n, m = len(x), len(y)
  if n < 2 or m < 2:
    raise ValueError(f'MMD needs at least 2 samples per set, got {n} and {m}')
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  return float((k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
               + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) - 2.0 * k_xy.mean())


def kid(x: np.ndarray, y: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> dict | None:
  """Kernel Inception Distance between features x [n, d] and y [m, d].

  `mmd2_unbiased` on `num_subsets` pairs of subsets, each drawn without replacement, of
  size min(subset_size, n, m) (the standard KID's defaults). Returns {'mean', 'std',
  'subset_size', 'num_subsets'}, or None when a set has fewer than 2 samples.
  """
  size = min(subset_size, len(x), len(y))
  if size < 2:
    return None
  rng = np.random.default_rng(seed)
  values = np.array([mmd2_unbiased(x[rng.choice(len(x), size, replace=False)],
                                   y[rng.choice(len(y), size, replace=False)])
                     for _ in range(num_subsets)])
  return {'mean': float(values.mean()), 'std': float(values.std()), 'subset_size': int(size),
          'num_subsets': int(num_subsets)}


def fid(x: np.ndarray, y: np.ndarray) -> float | None:
  """Frechet distance between Gaussians fitted to x [n, d] and y [m, d].

  |mu_x - mu_y|^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2)), sample covariances (ddof 1).
  None when a set has fewer than 2 samples.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or len(y) < 2:
    return None
  mu_x, mu_y = x.mean(0), y.mean(0)
  c_x = np.atleast_2d(np.cov(x, rowvar=False))
  c_y = np.atleast_2d(np.cov(y, rowvar=False))
  with warnings.catch_warnings():
    # Fewer samples than features (the per-class case here) makes the product singular,
    # which the bias note of the results already says; the root is still defined.
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(c_x @ c_y)
    if not np.all(np.isfinite(covmean)):
      # A singular product can defeat the Schur method; a small ridge, as the reference
      # implementation (pytorch-fid) adds, makes the root defined.
      ridge = 1e-6 * np.eye(len(c_x))
      covmean = scipy.linalg.sqrtm((c_x + ridge) @ (c_y + ridge))
  # Round-off gives the root of a (theoretically) PSD product a tiny imaginary part.
  covmean = np.real(covmean)
  return float(np.sum((mu_x - mu_y) ** 2) + np.trace(c_x) + np.trace(c_y)
               - 2.0 * np.trace(covmean))


def nearest_neighbours(queries: np.ndarray, references: np.ndarray, *,
                       leave_one_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Euclidean distance from each query [n, d] to its nearest reference [m, d].

  leave_one_out: the queries are the references (n == m) and each one's own entry is
  skipped, giving real-to-real distances to compare synthetic-to-real ones with.
  Returns (distances float64 [n], indices int [n] into references).
  """
  d = distance.cdist(np.asarray(queries, np.float64), np.asarray(references, np.float64))
  if leave_one_out:
    if d.shape[0] != d.shape[1]:
      raise ValueError(f'leave_one_out needs queries == references, got {d.shape}')
    np.fill_diagonal(d, np.inf)
  index = d.argmin(axis=1)
  return d[np.arange(len(d)), index], index


# ----------------------------------------------------------------------------- features


def _is_penultimate(module: nn.Module, method_name: str) -> bool:
  return method_name == '__call__' and module.path == PENULTIMATE


@functools.partial(jax.jit, static_argnames='model')
def _penultimate(variables, images, *, model):
  """Images [B, H, W, 3] in [0, 1] -> penultimate features [B, 128]."""
  _, state = model.apply(variables, images, train=False, capture_intermediates=_is_penultimate,
                         mutable=['intermediates'])
  (dense,) = state['intermediates'][PENULTIMATE[0]][PENULTIMATE[1]]['__call__']
  return nn.relu(dense)


def extract_features(model: nn.Module, variables, images: np.ndarray,
                     batch_size: int = 64) -> np.ndarray:
  """Penultimate features of uint8 images [N, H, W, 3] -> float32 [N, 128], in order.

  Evaluation mode (no dropout); batches are padded to one shape, so one compilation.
  """
  out = []
  for batch in ip.eval_batches(images, np.zeros(len(images), np.int32), batch_size):
    out.append(np.asarray(_penultimate(variables, batch['image'], model=model))[batch['mask']])
  if not out:
    return np.zeros((0, 128), np.float32)
  return np.concatenate(out)


def _train_once(run_config, run_dir: str, *, examples: ip.Examples, split: ip.Split,
                log: Callable) -> dict:
  """train.train_and_evaluate, unless run_dir/results.json marks it done; -> results."""
  results_path = os.path.join(run_dir, rundir.RESULTS)
  if os.path.exists(results_path):
    return utils.read_json(results_path)
  results = train.train_and_evaluate(run_config, run_dir, examples=examples, split=split,
                                     model_name=FEATURE_MODEL, augment=False,
                                     log=lambda s: log('  ' + s))
  utils.write_json(results_path, results)
  return results


def feature_run(config, workdir: str, view: str, examples: ip.Examples, split: ip.Split,
                log: Callable = print) -> str:
  """The run directory of the CNN trained on the split's real training images.

  The ablation's 'original' 'cnn' run of (view, split) when it is complete; otherwise one
  trained here, into WORKDIR/<view>/<split>/measures/feature_cnn.
  """
  run_dir = rundir.run_dir(workdir, view, split.name, 'original', FEATURE_MODEL)
  if rundir.is_finished(run_dir):
    return run_dir
  run_dir = rundir.feature_cnn_dir(workdir, view, split.name)
  if not rundir.is_finished(run_dir):
    log(f'  no original/{FEATURE_MODEL} run of {view} {split.name}: training the feature CNN '
        f'into {run_dir}')
  _train_once(rundir.run_config(config, view, 'original', FEATURE_MODEL), run_dir,
              examples=examples, split=split, log=log)
  return run_dir


# ----------------------------------------------------------------------------- measures


def _per_class(fn, real_x, real_y, fake_x, fake_y, class_names) -> dict:
  return {name: fn(real_x[real_y == c], fake_x[fake_y == c]) for c, name in enumerate(class_names)}


def _distance_summary(d: np.ndarray) -> dict | None:
  if len(d) == 0:
    return None
  return {'min': float(d.min()), 'median': float(np.median(d)), 'n': int(len(d))}


def memorisation(real: np.ndarray, real_y: np.ndarray, fake: np.ndarray, fake_y: np.ndarray,
                 class_names) -> tuple[dict, np.ndarray, np.ndarray]:
  """Nearest-real-image distances of synthetic vs real images, in one space.

  real [n, d] (the GAN's training images), fake [m, d]; labels [n], [m].
  Returns (summary per class and overall, distances [m], nearest real index [m]).
  median_ratio = median synthetic-to-real / median real-to-real (leave one out): well
  below 1 means the synthetic images sit closer to real ones than real ones to each other.
  """
  fake_d, fake_nn = nearest_neighbours(fake, real)
  real_d, _ = nearest_neighbours(real, real, leave_one_out=True)

  def summary(fd, rd, same):
    s = {'synthetic_to_real': _distance_summary(fd), 'real_to_real': _distance_summary(rd)}
    if len(fd) and len(rd):
      s['median_ratio'] = float(np.median(fd) / max(np.median(rd), 1e-12))
      s['nearest_real_same_class'] = float(np.mean(same))
    return s

  same = real_y[fake_nn] == fake_y
  out = {'overall': summary(fake_d, real_d, same), 'per_class': {}}
  for c, name in enumerate(class_names):
    out['per_class'][name] = summary(fake_d[fake_y == c], real_d[real_y == c], same[fake_y == c])
  return out, fake_d, fake_nn


def classification_accuracy_score(run_config, cas_dir: str, *, examples: ip.Examples,
                                  split: ip.Split, images: np.ndarray, labels: np.ndarray,
                                  log: Callable = print) -> dict:
  """Trains the CNN on the synthetic images alone; tests it on the split's real test images.

  Validation (model selection) uses the split's real validation images. The CNN gets the
  updates of the real-trained one it is compared with (run_config's epochs, and as many steps
  per epoch as one pass over the split's real training images, each epoch's batches drawn
  from a fresh permutation of the synthetic images): the synthetic set is several times
  larger, and more updates alone would flatter it. The run lives in cas_dir (results.json
  marks it done). Returns accuracy and balanced accuracy, per seed (mean, std) and of the
  seed ensemble, and the training budget.
  """
  steps = ip.epoch_steps(run_config.train, num_real=len(split.train), num_extra=0)
  run_config = run_config.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.train.max_steps_per_epoch = steps
  m, nv, nt = len(labels), len(split.val), len(split.test)
  real_ids = examples.image_ids.astype(str)
  cas_examples = ip.Examples(
      images=np.concatenate([images, examples.images[split.val], examples.images[split.test]]),
      labels=np.concatenate([np.asarray(labels, np.int32), examples.labels[split.val],
                             examples.labels[split.test]]),
      image_ids=np.concatenate([ip.synthetic_image_ids(labels, examples.class_names),
                                real_ids[split.val], real_ids[split.test]]),
      class_names=examples.class_names,
      is_synthetic=np.arange(m + nv + nt) < m)
  cas_split = ip.Split(split.name, train=np.arange(m), val=m + np.arange(nv),
                       test=m + nv + np.arange(nt))
  results = _train_once(run_config, cas_dir, examples=cas_examples, split=cas_split, log=log)
  test = results['splits']['test']
  return {
      'n_train_synthetic': m, 'n_test_real': nt,
      'accuracy_mean': test['seed_summary']['accuracy']['mean'],
      'accuracy_std': test['seed_summary']['accuracy']['std'],
      'balanced_accuracy_mean': test['seed_summary']['balanced_accuracy']['mean'],
      'balanced_accuracy_std': test['seed_summary']['balanced_accuracy']['std'],
      'accuracy_ensemble': test['ensemble']['accuracy'],
      'balanced_accuracy_ensemble': test['ensemble']['balanced_accuracy'],
      'seeds': results['seeds'], 'run_dir': cas_dir,
      'epochs': int(run_config.train.epochs), 'steps_per_epoch': int(steps),
  }


def _real_trained(results: dict) -> dict:
  """The same numbers for the feature CNN's run, trained on the real training images."""
  test = results['splits']['test']
  return {'accuracy_mean': test['seed_summary']['accuracy']['mean'],
          'balanced_accuracy_mean': test['seed_summary']['balanced_accuracy']['mean'],
          'accuracy_ensemble': test['ensemble']['accuracy'],
          'balanced_accuracy_ensemble': test['ensemble']['balanced_accuracy']}


def _write_grids(gan_dir, real_images, real_y, fake_images, fake_y, pix_d, pix_nn, feat_d,
                 feat_nn, num_classes: int, per_row: int = 6, pairs: int = 8) -> list[str]:
  """The PNGs of one GAN (uint8 images in, file names out).

  real_vs_synthetic.png: a row per class, `per_row` real training images, a white gap,
  `per_row` synthetic ones (white where a class has fewer).
  closest_pairs_<space>.png: the `pairs` synthetic images nearest to a real one (top row,
  closest first, as measures.json's 'closest') above their nearest real image.
  """
  h, w = real_images.shape[1:3]
  white = np.full((h, w, 3), 255, np.uint8)
  pick = lambda x: [x[k] if k < len(x) else white for k in range(per_row)]
  rows = [pick(real_images[real_y == c]) + [white] + pick(fake_images[fake_y == c])
          for c in range(num_classes)]
  plots.save_image_grid(np.asarray(rows) / 255.0, os.path.join(gan_dir, 'real_vs_synthetic.png'))
  names = ['real_vs_synthetic.png']
  for space, d, nn_index in (('pixel', pix_d, pix_nn), ('feature', feat_d, feat_nn)):
    order = np.argsort(d, kind='stable')[:pairs]
    pairs_grid = np.stack([fake_images[order], real_images[nn_index[order]]])
    name = f'closest_pairs_{space}.png'
    plots.save_image_grid(pairs_grid / 255.0, os.path.join(gan_dir, name))
    names.append(name)
  return names


def measure_gan(config, workdir: str, view: str, gan_dir: str, *, examples: ip.Examples,
                split: ip.Split, log: Callable = print) -> dict:
  """All measures of one GAN's synthetic.npz; writes measures.json (last) and the PNGs."""
  t0 = time.time()
  with np.load(os.path.join(gan_dir, rundir.SYNTHETIC)) as z:
    fake_images, fake_y = z['images'], z['labels']
  class_names = examples.class_names
  paper = config.split.protocol == 'paper'
  # The images the GAN saw: ablation.paper_pool trains it on every image of the view.
  gan_train = np.arange(len(examples)) if paper else split.train
  real_images, real_y = examples.images[gan_train], examples.labels[gan_train]
  out = {
      'view': view, 'split': split.name,
      'gan_kind': os.path.basename(gan_dir)[len(rundir.GAN_PREFIX):],
      'protocol': config.split.protocol,
      'n_real': ip.class_counts(real_y, class_names),
      'n_synthetic': ip.class_counts(fake_y, class_names),
      'notes': [FID_NOTE, MIXTURE_NOTE],
  }
  if paper:
    out['leaky'] = True
    out['notes'].append('Paper protocol (LEAKY): this GAN saw every real image, the CAS test '
                        'images included, so CAS overstates what the synthetic images teach.')
  if len(fake_y) == 0:
    out['notes'].append('No synthetic images: every class already had its target count.')
    utils.write_json(os.path.join(gan_dir, rundir.MEASURES), out)
    return out

  feature_dir = feature_run(config, workdir, view, examples, split, log)
  feature_cnn = rundir.restore_run(feature_dir)
  if feature_cnn.config.train.standardize:
    # The features below are taken from images in [0, 1], as the feature CNN was trained.
    raise ValueError(f'{feature_dir}: the measures need a feature CNN trained without '
                     'config.train.standardize.')
  model, variables = feature_cnn.model, feature_cnn.seed_variables(0)
  real_f = extract_features(model, variables, real_images)
  fake_f = extract_features(model, variables, fake_images)
  out['feature_space'] = {
      'layer': '/'.join(PENULTIMATE) + ' + ReLU', 'dim': int(real_f.shape[1]),
      'run_dir': os.path.relpath(feature_dir, workdir), 'seed_index': 0,
      'selection': 'validation-selected parameters (best_params)'}
  log(f'  features {real_f.shape[1]}-d of {len(real_f)} real and {len(fake_f)} synthetic images '
      f'(from {os.path.relpath(feature_dir, workdir)})')

  out['kid'] = {'overall': kid(real_f, fake_f),
                'per_class': _per_class(kid, real_f, real_y, fake_f, fake_y, class_names)}
  out['fid'] = {'overall': fid(real_f, fake_f),
                'per_class': _per_class(fid, real_f, real_y, fake_f, fake_y, class_names)}
  kid_all = out['kid']['overall']
  log(f'  KID {kid_all["mean"]:.4f} ± {kid_all["std"]:.4f}, FID {out["fid"]["overall"]:.2f} '
      '(biased at this size)')

  # Pixels in [0, 1] divided by sqrt(H W 3): Euclidean distances become root mean square
  # differences, comparable between views of different sizes.
  pixels = lambda x: x.reshape(len(x), -1) / (255.0 * np.sqrt(x[0].size))
  feat_mem, feat_d, feat_nn = memorisation(real_f, real_y, fake_f, fake_y, class_names)
  pix_mem, pix_d, pix_nn = memorisation(pixels(real_images), real_y, pixels(fake_images), fake_y,
                                        class_names)
  real_ids = examples.image_ids[gan_train]
  closest = lambda d, nn_index: [
      {'synthetic_index': int(i), 'class': class_names[fake_y[i]],
       'nearest_real_image_id': int(real_ids[nn_index[i]]), 'distance': float(d[i])}
      for i in np.argsort(d, kind='stable')[:8]]
  out['memorisation'] = {
      'feature': {**feat_mem, 'metric': 'Euclidean', 'closest': closest(feat_d, feat_nn)},
      'pixel': {**pix_mem, 'metric': 'root mean square difference, values in [0, 1]',
                'closest': closest(pix_d, pix_nn)}}
  log(f'  nearest real image, median synthetic / real-to-real: feature '
      f'{feat_mem["overall"]["median_ratio"]:.2f}, pixel {pix_mem["overall"]["median_ratio"]:.2f}')
  out['files'] = _write_grids(gan_dir, real_images, real_y, fake_images, fake_y, pix_d, pix_nn,
                              feat_d, feat_nn, len(class_names))

  run_config = feature_cnn.config
  log(f'  CAS: training {run_config.num_seeds} seeds x {run_config.train.epochs} epochs on the '
      f'{len(fake_y)} synthetic images alone')
  out['cas'] = classification_accuracy_score(
      run_config, os.path.join(gan_dir, 'cas'), examples=examples, split=split,
      images=fake_images, labels=fake_y, log=log)
  out['cas']['run_dir'] = os.path.relpath(out['cas']['run_dir'], workdir)  # like feature_space's
  out['cas']['real_trained'] = _real_trained(feature_cnn.results)
  missing = [n for n, k in out['n_synthetic'].items() if k == 0]
  if missing:
    out['notes'].append(f'CAS: no synthetic images of {", ".join(missing)} (those classes had '
                        'their target count), so the CAS classifier never predicts them.')
  log(f'  CAS test accuracy {out["cas"]["accuracy_mean"]:.3f} (balanced '
      f'{out["cas"]["balanced_accuracy_mean"]:.3f}); trained on real images: '
      f'{out["cas"]["real_trained"]["accuracy_mean"]:.3f}')
  out['seconds'] = time.time() - t0
  utils.write_json(os.path.join(gan_dir, rundir.MEASURES), out)
  return out


def measure_workdir(workdir: str, config=None, log: Callable = print) -> list[str]:
  """Measures every cached synthetic.npz of an ablation work directory without a
  measures.json; config: the ablation's (default: WORKDIR/config.json).
  Returns the measures.json paths written."""
  if config is None:
    config = ml_collections.ConfigDict(rundir.read_config(workdir))
  gans = rundir.find_gan_dirs(workdir, with_synthetic=True)
  written, by_view = [], {}
  for i, gan in enumerate(gans):
    tag = f'[{i + 1}/{len(gans)}] {os.path.relpath(gan.path, workdir)}'
    if os.path.exists(os.path.join(gan.path, rundir.MEASURES)):
      log(f'{tag}: measured, skipped')
      continue
    if gan.view not in by_view:
      examples = ip.load_examples(rundir.run_config(config, gan.view, 'original',
                                                    FEATURE_MODEL).data)
      by_view[gan.view] = (examples, {s.name: s for s in ip.make_splits(examples.labels,
                                                                        config.split)})
    examples, splits = by_view[gan.view]
    if gan.split not in splits:
      raise ValueError(f'{gan.path}: split {gan.split!r} is not one of the '
                       f'{config.split.protocol} protocol of {workdir}/config.json '
                       f'({", ".join(splits)})')
    log(f'{tag}: measuring')
    t0 = time.time()
    measure_gan(config, workdir, gan.view, gan.path, examples=examples, split=splits[gan.split],
                log=log)
    written.append(os.path.join(gan.path, rundir.MEASURES))
    log(f'{tag}: done in {utils.format_duration(time.time() - t0)}')
  return written


def main(argv):
  from absl import flags
  from absl import logging
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  measure_workdir(flags.FLAGS.workdir, log=lambda s: print(s, flush=True))


if __name__ == '__main__':
  from absl import app
  from absl import flags
  flags.DEFINE_string('workdir', None, 'An ablation work directory (holds config.json).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
