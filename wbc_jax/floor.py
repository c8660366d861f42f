"""A non-deep floor: nucleus segmentation by colour, hand-made features, a scikit-learn model.

Every deep number is reported next to this one. It sees the same images and the same splits
as the deep runs and is selected the same honest way (validation only), so the difference
between the two is what learning the features bought.

  segment_nucleus(image [H, W, 3] uint8)      -> bool [H, W], the central WBC's nucleus
  nucleus_features(images [N, H, W, 3] uint8) -> float32 [N, F], F = len(FEATURE_NAMES)
  train_and_evaluate(config, workdir, ...)    -> results.json's contents, as
                                                 `wbc_jax.train.train_and_evaluate`

Segmentation. In a Wright/Giemsa smear the nucleus is the only strongly violet object: blue
well above red and green (`violet` = B - (R + G) / 2, in [0, 255] units), where red cells
(pink, R > B) and the pale background (grey) score at or below 0 and an eosinophil's
red-orange granules (R high) and a monocyte's grey-blue cytoplasm score low. The threshold is
Otsu's on the image's violet values, kept above a floor so that an image without a nucleus
does not promote its cytoplasm or its noise; a small opening removes specks, and the
components kept are the one nearest the centre plus those joined to it by a thin bridge or
close to it (the lobes of one nucleus), never a neighbouring cell's nucleus.

Features (`FEATURE_NAMES`): the nucleus' shape (area, lobes after an erosion, peaks of its
distance transform, solidity against the convex hull, extent, eccentricity and axes from the
second moments, perimeter^2 / area, thickness, holes), its chromatin, and colour statistics
of the nucleus, of two rings around it (the cytoplasm: granules, tint, texture) and of the
rest of the image; whole-image colour percentiles need no segmentation at all.

Measured on BCCD (5-fold stratified, `configs/ablation.py:test` with split.protocol='kfold',
64 px crops; pooled out-of-fold test predictions): balanced accuracy 0.77 / accuracy 0.79 on
the 288 px window crops, 0.78 / 0.82 on the per-box crops. Most errors are eosinophils and
neutrophils taken for one another (the cytoplasm's tint is most of what tells them apart at
this size, and some of BCCD's labels of the two are doubtful).

Sizes scale with the image side (`_scale`: 1 at 64 px), so a 32 or 128 px view gets the same
morphology. Only numpy, scipy and scikit-learn are used.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
from scipy import ndimage as ndi
from scipy import spatial
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wbc_jax import metrics as metrics_lib
from wbc_jax import plots
from wbc_jax import utils

# The floor's name in configs and run directories, and in the report's tables.
NAME = 'floor'
LABEL = 'non-deep floor'
# Otsu's threshold on the violet score is never taken below this: a nucleus is at least this
# violet (~50-100 at its core); cytoplasm, granules and red cells mostly score below 15.
MIN_VIOLET = 30.0
# Histogram bins of the violet score for Otsu's threshold.
_OTSU_BINS = 64


def _scale(shape) -> float:
  """Length unit of the morphology: 1 at a 64 px side."""
  return min(shape[0], shape[1]) / 64.0


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}.')
  if min(image.shape[:2]) < 8:
    raise ValueError(f'expected an image of at least 8x8 pixels, got {image.shape[:2]}.')
  return image


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(
        f'expected uint8 RGB images [N, H, W, 3], got {images.dtype} {images.shape}.')
  if min(images.shape[1:3]) < 8:
    raise ValueError(f'expected images of at least 8x8 pixels, got {images.shape[1:3]}.')
  return images


def violet(image: np.ndarray) -> np.ndarray:
  """The violet score B - (R + G) / 2. image uint8 [H, W, 3] -> float32 [H, W] in
  [-255, 255]."""
  x = image.astype(np.float32)
  return x[..., 2] - (x[..., 0] + x[..., 1]) / 2


def otsu_threshold(values: np.ndarray, bins: int = _OTSU_BINS) -> float:
  """Otsu's threshold of a set of values [...] (the one maximising between-class variance)."""
  values = np.ravel(values)
  lo, hi = float(values.min()), float(values.max())
  if hi - lo < 1e-6:
    return hi
  hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
  centres = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(hist)
  w1 = w0[-1] - w0
  m0 = np.cumsum(hist * centres)
  mu0 = m0 / np.maximum(w0, 1)
  mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
  between = w0 * w1 * (mu0 - mu1) ** 2
  # The threshold sits at the upper edge of the first class.
  return float(edges[1:][np.argmax(between)])


def _disk(radius: float) -> np.ndarray:
  r = max(int(round(radius)), 0)
  y, x = np.mgrid[-r:r + 1, -r:r + 1]
  # '+ r' rounds the edge outwards: a radius-1 disk is the 3x3 square, radius 2 a 5x5 octagon.
  return x * x + y * y <= r * r + r


def segment_nucleus(image: np.ndarray) -> np.ndarray:
  """The nucleus of the white blood cell nearest the image centre.

  image: uint8 RGB [H, W, 3]. Returns bool [H, W]; all False when no violet object is found.
  """
  image = _check_image(image)
  h, w = image.shape[:2]
  s = _scale(image.shape)
  v = ndi.uniform_filter(violet(image), size=3 if s >= 0.75 else 1)
  t = max(otsu_threshold(v), MIN_VIOLET)
  raw = v > t
  # Specks (platelets, stain debris) are smaller than the opening's disk; one-pixel gaps
  # inside a lobe are closed by filling holes no larger than a few pixels.
  mask = ndi.binary_opening(raw, structure=_disk(s))
  mask = _fill_small_holes(mask, max_area=4 * s * s)
  labels, n = ndi.label(mask)
  if n == 0:
    return np.zeros((h, w), bool)
  sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
  # A component must be of nucleus size (a platelet is ~2-3 px across at 64 px).
  big = np.flatnonzero(sizes >= 6 * s * s) + 1
  if big.size == 0:
    return np.zeros((h, w), bool)
  yy, xx = np.mgrid[:h, :w]
  dist = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
  nearest = ndi.minimum(dist, labels, index=big)
  # The central cell's nucleus: the component closest to the centre, weighed a little by
  # size so that a speck on the centre does not beat the nucleus beside it.
  score = np.asarray(nearest) - 0.5 * np.sqrt(sizes[big - 1])
  main = big[int(np.argmin(score))]
  keep = labels == main
  # Lobes of the same nucleus are joined by thin bridges, which the opening may cut, or lie
  # within a few pixels of each other; a neighbouring cell's nucleus is neither (the
  # cytoplasm of both cells lies between them). 8-connected: a bridge may run diagonally.
  raw_labels, _ = ndi.label(raw, structure=np.ones((3, 3), bool))
  same = np.isin(raw_labels, np.unique(raw_labels[keep]))
  near = ndi.binary_dilation(keep, structure=_disk(3 * s)) | same
  for k in big:
    if k != main and (near & (labels == k)).any():
      keep |= labels == k
  return keep


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
  holes = ndi.binary_fill_holes(mask) & ~mask
  labels, n = ndi.label(holes)
  if n == 0:
    return mask
  sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
  small = np.isin(labels, np.flatnonzero(sizes <= max_area) + 1)
  return mask | small


# ----------------------------------------------------------------------------- features

# The rings around the nucleus, in pixels at 64 px (scaled by `_scale`): the near one holds
# the cytoplasm of most cells, the far one the outer cytoplasm of large cells (monocytes,
# eosinophils) or already red cells and background around small ones (lymphocytes).
_RING_NEAR = 4.0
_RING_FAR = 9.0
# 'Red-orange' pixels of eosinophil granules: much more red than green, and redder than blue
# (a neutrophil's cytoplasm is lilac, B >= R; red cells are paler, R - G ~ 15-30).
_GRANULE_RG = 30.0
_REGIONS = ('nuc', 'ring', 'far', 'out')
_COLOUR_STATS = ('r', 'g', 'b', 'bright_std', 'violet', 'rg', 'sat', 'pale')

FEATURE_NAMES: tuple[str, ...] = (
    # Nucleus shape; lengths as fractions of the image side, area of the image.
    'area', 'n_components', 'n_lobes', 'largest_lobe', 'solidity', 'extent', 'eccentricity',
    'major_axis', 'minor_axis', 'compactness', 'n_peaks', 'thickness_max', 'thickness_mean',
    'holes', 'centre_offset',
    # Chromatin, and the cytoplasm's granules and tint in the ring around the nucleus.
    'nuc_violet_std', 'nuc_dark_frac', 'ring_granule', 'ring_rg_p90', 'ring_rb', 'ring_rb_p90',
    'ring_texture', 'far_granule',
    # Whole-image colour summaries (no segmentation needed).
    'img_violet_p50', 'img_violet_p90', 'img_violet_p99', 'img_violet_gt10', 'img_violet_gt30',
    'img_rg_p90', 'img_granule',
    # Colour statistics (`_masked_stats`) of the nucleus, the near and far rings and the rest.
) + tuple(f'{r}_{s}' for r in _REGIONS for s in _COLOUR_STATS)


def nucleus_features(images: np.ndarray) -> np.ndarray:
  """Shape and colour features of each image's central nucleus and its surroundings.

  images: uint8 RGB [N, H, W, 3]. Returns float32 [N, len(FEATURE_NAMES)], all finite (an
  image without a nucleus gets zeros for the nucleus' shape and colour).
  """
  images = _check_images(images)
  out = np.zeros((len(images), len(FEATURE_NAMES)), np.float32)
  for i, image in enumerate(images):
    out[i] = _features_one(image, segment_nucleus(image))
  return out


def _masked_stats(x: np.ndarray, mask: np.ndarray) -> dict:
  """Colour statistics of the pixels under mask. x: float [H, W, 3] in [0, 255]."""
  if not mask.any():
    return {k: 0.0 for k in _COLOUR_STATS}
  px = x[mask]
  r, g, b = px[:, 0], px[:, 1], px[:, 2]
  hi, lo = px.max(axis=1), px.min(axis=1)
  sat = (hi - lo) / np.maximum(hi, 1.0)
  return {'r': r.mean() / 255, 'g': g.mean() / 255, 'b': b.mean() / 255,
          'bright_std': px.mean(axis=1).std() / 255,
          'violet': (b - (r + g) / 2).mean() / 255, 'rg': (r - g).mean() / 255,
          'sat': sat.mean(),
          # The pale background (or a pale cytoplasm): bright and grey.
          'pale': ((sat < 0.12) & (hi > 170)).mean()}


def _shape_features(mask: np.ndarray, s: float) -> dict:
  """Shape of a nucleus mask [H, W] (True somewhere); lengths relative to the image side."""
  h, w = mask.shape
  side = float(min(h, w))
  area = float(mask.sum())
  _, n_comp = ndi.label(mask)
  # A bridge between lobes is a few pixels wide at 64 px: two erosions cut it, where a
  # lymphocyte's round nucleus stays whole.
  eroded = ndi.binary_erosion(mask, iterations=max(int(round(2 * s)), 1))
  lobe_labels, n_lobes = ndi.label(eroded)
  if n_lobes:
    lobe_sizes = ndi.sum_labels(np.ones_like(lobe_labels), lobe_labels,
                                index=np.arange(1, n_lobes + 1))
    # Crumbs of the erosion are no lobes.
    n_lobes = int((lobe_sizes >= 3 * s * s).sum())
    largest = lobe_sizes.max() / max(eroded.sum(), 1)
  else:
    largest = 1.0
  ys, xs = np.nonzero(mask)
  # Convex hull of the pixels' corners (a line of pixels still has an area).
  corners = np.concatenate([np.stack([ys + dy, xs + dx], 1)
                            for dy in (0, 1) for dx in (0, 1)]).astype(np.float64)
  try:
    hull = spatial.ConvexHull(corners).volume
  except spatial.QhullError:
    hull = area
  bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
  cov = np.cov(np.stack([ys, xs]).astype(np.float64)) if area > 1 else np.zeros((2, 2))
  evals = np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1]
  ecc = np.sqrt(1 - evals[1] / evals[0]) if evals[0] > 0 else 0.0
  boundary = mask & ~ndi.binary_erosion(mask)
  dt = ndi.distance_transform_edt(mask)
  # Each lobe is a ridge of the distance to the nucleus' edge: its local maxima count the
  # lobes even where the lobes touch at this resolution (a round nucleus has one or two).
  peaks = (ndi.maximum_filter(dt, size=2 * int(round(2 * s)) + 1) == dt) & (dt >= 1.5 * s)
  filled = ndi.binary_fill_holes(mask)
  cy, cx = ys.mean(), xs.mean()
  return {
      'area': area / (h * w), 'n_components': float(n_comp), 'n_lobes': float(n_lobes),
      'largest_lobe': float(largest), 'solidity': area / max(hull, 1.0),
      'extent': area / bbox, 'eccentricity': float(ecc),
      # 4 sqrt(eigenvalue): the full axis of an ellipse with those second moments.
      'major_axis': 4 * np.sqrt(evals[0]) / side, 'minor_axis': 4 * np.sqrt(evals[1]) / side,
      'compactness': boundary.sum() ** 2 / (4 * np.pi * area),
      'n_peaks': float(ndi.label(peaks)[1]), 'thickness_max': dt.max() / side,
      'thickness_mean': dt[mask].mean() / np.sqrt(area),
      'holes': (filled.sum() - area) / filled.sum(),
      'centre_offset': np.hypot(cy - (h - 1) / 2, cx - (w - 1) / 2) / side,
  }


def _features_one(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  s = _scale(image.shape)
  x = image.astype(np.float32)
  vio = violet(image)
  rg = x[..., 0] - x[..., 1]
  granule = (rg > _GRANULE_RG) & (x[..., 0] > x[..., 2])
  f = dict.fromkeys(FEATURE_NAMES, 0.0)
  if mask.any():
    f.update(_shape_features(mask, s))
    near = ndi.binary_dilation(mask, structure=_disk(_RING_NEAR * s))
    far = ndi.binary_dilation(near, structure=_disk((_RING_FAR - _RING_NEAR) * s))
    ring, far = near & ~mask, far & ~near
    f['nuc_violet_std'] = vio[mask].std() / 255
    # Dark chromatin: lymphocytes' dense nuclei against monocytes' lacy ones.
    f['nuc_dark_frac'] = (x[mask].mean(axis=1) < 120).mean()
    if ring.any():
      f['ring_granule'] = granule[ring].mean()
      f['ring_rg_p90'] = np.percentile(rg[ring], 90) / 255
      # Red against blue: granules are redder than blue, a neutrophil's lilac cytoplasm not.
      rb = x[..., 0][ring] - x[..., 2][ring]
      f['ring_rb'], f['ring_rb_p90'] = rb.mean() / 255, np.percentile(rb, 90) / 255
      # Granularity: the local contrast of the cytoplasm (eosinophils' coarse granules).
      lap = np.abs(ndi.laplace(x.mean(axis=2)))
      f['ring_texture'] = lap[ring].mean() / 255
    if far.any():
      f['far_granule'] = granule[far].mean()
    out = ~(near | far)
    regions = {'nuc': mask, 'ring': ring, 'far': far, 'out': out}
  else:
    regions = {'out': np.ones(mask.shape, bool)}
  for name, m in regions.items():
    for k, v in _masked_stats(x, m).items():
      f[f'{name}_{k}'] = v
  f.update({'img_violet_p50': np.percentile(vio, 50) / 255,
            'img_violet_p90': np.percentile(vio, 90) / 255,
            'img_violet_p99': np.percentile(vio, 99) / 255,
            'img_violet_gt10': (vio > 10).mean(), 'img_violet_gt30': (vio > 30).mean(),
            'img_rg_p90': np.percentile(rg, 90) / 255, 'img_granule': granule.mean()})
  vec = np.asarray([f[k] for k in FEATURE_NAMES], np.float64)
  return np.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


# ----------------------------------------------------------------------------- classifier


def candidates(seed: int) -> dict:
  """The models compared on validation, simplest first (ties keep the earlier one).

  All weigh the classes inversely to their training frequency: with ~60% neutrophils an
  unweighted model buys accuracy by never naming a monocyte, and the selection score is the
  balanced accuracy.
  """
  def logistic(c):
    return make_pipeline(StandardScaler(), LogisticRegression(
        C=c, class_weight='balanced', max_iter=5000, random_state=seed))
  return {
      'logreg_C0.1': logistic(0.1),
      'logreg_C1': logistic(1.0),
      'logreg_C10': logistic(10.0),
      # Small trees and strong regularisation: ~200 training images. No early stopping, so
      # no internal split of the training images draws on the seed.
      'hgb': HistGradientBoostingClassifier(
          learning_rate=0.05, max_iter=200, max_leaf_nodes=8, min_samples_leaf=5,
          l2_regularization=1.0, class_weight='balanced', early_stopping=False,
          random_state=seed),
  }


def predict_proba(model, features: np.ndarray, num_classes: int) -> np.ndarray:
  """Class probabilities [N, num_classes] of a fitted model; a class absent from its
  training labels gets probability 0."""
  probs = np.zeros((len(features), num_classes), np.float32)
  probs[:, model.classes_] = model.predict_proba(features)
  return probs


def fit_select(train_f: np.ndarray, train_y: np.ndarray, val_f: np.ndarray, val_y: np.ndarray,
               *, num_classes: int, seed: int) -> tuple[str, object, dict]:
  """Fits every candidate on the training features [N, F] and labels [N], scores each by
  balanced accuracy on the validation ones. Returns (chosen name, its fitted model,
  {name: validation balanced accuracy})."""
  if len(np.unique(train_y)) < 2:
    raise ValueError('the floor classifier needs at least two classes in the training split, '
                     f'got {np.unique(train_y).tolist()}.')
  fitted, scores = {}, {}
  for name, model in candidates(seed).items():
    model.fit(train_f, train_y)
    preds = predict_proba(model, val_f, num_classes).argmax(-1)
    fitted[name] = model
    scores[name] = metrics_lib.balanced_accuracy(val_y, preds, num_classes)
  # max keeps the first maximum: on a tie the simpler (earlier) candidate.
  chosen = max(scores, key=scores.get)
  return chosen, fitted[chosen], scores


def _num_params(model) -> int:
  """Fitted numbers of a candidate: a logistic regression's coefficients and intercepts (the
  scaler's means and scales not counted); a boosted model's leaf values."""
  if isinstance(model, HistGradientBoostingClassifier):
    try:  # sklearn's trees are private; 0 ("not counted") if their layout ever changes
      return int(sum(int(p.nodes['is_leaf'].sum()) for trees in model._predictors
                     for p in trees))
    except (AttributeError, KeyError, TypeError):
      return 0
  lr = model[-1]
  return int(lr.coef_.size + lr.intercept_.size)


def train_and_evaluate(config, workdir: str, *, examples, split, model_name: str = NAME,
                       augment: bool = False, extra=None, log: Callable = print) -> dict:
  """Fits the floor classifier on one split; writes its files to `workdir`.

  The signature and the returned dict (results.json's contents) are those of
  `wbc_jax.train.train_and_evaluate`, for one deterministic "seed" (config.seed): probabilities
  [1, N, C], best_epoch [0]. Each candidate (`candidates`) is fitted on the training images'
  features (+ `extra`, (uint8 images [M, H, W, 3], labels [M]), training only) and the one
  with the best validation balanced accuracy is kept; it is not refitted on train + val (the
  validation images choose it; `train.fit_on` is the deep runs' field). The test images are
  featurised and predicted, never looked at for a choice. `augment` is ignored: the features
  are nearly invariant to flips and small rotations already.

  Writes config.json, predictions.npz (val/test probs [1, N, C], labels, image_ids),
  metrics.jsonl (one line: the candidates' validation scores) and confusion_test.png.
  Adds to the deep runs' keys: 'floor': {'chosen', 'val_balanced_accuracy': {name: value}}.
  """
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  utils.write_atomic(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  class_names = tuple(examples.class_names)
  num_classes = len(class_names)
  seed = int(config.seed)
  feats = nucleus_features(examples.images)
  labels = np.asarray(examples.labels)
  train_f, train_y = feats[split.train], labels[split.train]
  n_extra = 0
  if extra is not None:
    extra_x, extra_y = extra
    n_extra = len(extra_y)
    if n_extra:
      train_f = np.concatenate([train_f, nucleus_features(extra_x)])
      train_y = np.concatenate([train_y, np.asarray(extra_y, labels.dtype)])
  chosen, model, scores = fit_select(train_f, train_y, feats[split.val], labels[split.val],
                                     num_classes=num_classes, seed=seed)
  train_seconds = time.time() - t0
  log(f'  floor: chose {chosen} (val balanced accuracy '
      + ', '.join(f'{k} {v:.3f}' for k, v in scores.items()) + ')')

  results = {'model': model_name, 'split': split.name, 'seeds': [seed], 'best_epoch': [0],
             'best_val_accuracy': [], 'select': 'val_balanced_accuracy',
             'best_score': [float(scores[chosen])], 'num_params': _num_params(model),
             'n_train_real': int(len(split.train)), 'n_train_extra': int(n_extra),
             'class_names': list(class_names), 'train_seconds': float(train_seconds),
             'splits': {}}
  arrays = {}
  # 'train' holds the real training images only, as the deep runs report it.
  for name in ('train', 'val', 'test'):
    idx = getattr(split, name)
    y = labels[idx]
    probs = predict_proba(model, feats[idx], num_classes)[None]  # [1, N, C]
    results['splits'][name] = metrics_lib.split_metrics(y, probs, class_names)
    if name == 'val':
      results['best_val_accuracy'] = [float((probs[0].argmax(-1) == y).mean())]
    if name != 'train':
      arrays.update({f'{name}_probs': probs, f'{name}_labels': y,
                     f'{name}_image_ids': examples.image_ids[idx]})
  results['majority_baseline'] = metrics_lib.majority_baseline(
      labels[split.train], labels[split.test], num_classes)
  results['test_variants'] = {}
  results['floor'] = {'chosen': chosen, 'val_balanced_accuracy': scores}
  utils.write_jsonl(os.path.join(workdir, 'metrics.jsonl'), [
      {'epoch': 0, 'chosen': chosen, 'val_balanced_accuracy': scores,
       'val_acc': results['best_val_accuracy'], 'seconds': train_seconds}])
  np.savez(os.path.join(workdir, 'predictions.npz'), **arrays)
  cm = np.asarray(results['splits']['test']['ensemble']['confusion_matrix'])
  plots.plot_confusion_matrix(cm, list(class_names), os.path.join(workdir, 'confusion_test.png'),
                              title=f'{model_name}: test ({chosen})')
  return results
