"""The non-deep floor on smears drawn with numpy: segmentation, features, the honest fit."""

import json
import os

import ml_collections
import numpy as np
import pytest

from wbc_jax import floor
from wbc_jax import input_pipeline as ip

CLASS_NAMES = ('EOSINOPHIL', 'LYMPHOCYTE', 'MONOCYTE', 'NEUTROPHIL')
SIZE = 64
BACKGROUND = (226, 228, 220)   # pale grey-green
RED_CELL = (214, 160, 158)     # pink
CYTOPLASM = (214, 200, 214)    # pale lilac (violet score ~7, far below a nucleus')
NUCLEUS = (112, 92, 198)       # violet (score ~96)
GRANULES = (220, 120, 130)     # red-orange, redder than blue


def _disk(cy, cx, r, size=SIZE):
  yy, xx = np.mgrid[:size, :size]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _smear(rng, red_cells=4, noise=4.0):
  """float [SIZE, SIZE, 3]: background with a few red cells near the border."""
  image = np.empty((SIZE, SIZE, 3))
  image[:] = BACKGROUND
  for _ in range(red_cells):
    # On the border ring only, so a red cell never covers the central white cell.
    angle = rng.uniform(0, 2 * np.pi)
    cy, cx = 32 + 27 * np.sin(angle), 32 + 27 * np.cos(angle)
    image[_disk(cy, cx, rng.uniform(6, 8))] = RED_CELL
  return image + rng.normal(0, noise, image.shape)


def _to_uint8(image):
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def round_cell(rng, radius=9.0, cell=14.0, centre=(32, 32)):
  """uint8 [SIZE, SIZE, 3] with one round nucleus, and its drawn mask."""
  image = _smear(rng)
  image[_disk(*centre, cell)] = CYTOPLASM
  nucleus = _disk(*centre, radius)
  image[nucleus] = NUCLEUS
  return _to_uint8(image + rng.normal(0, 3.0, image.shape)), nucleus


def lobed_cell(rng, lobes=2, radius=5.0, cell=15.0, granules=0.0):
  """uint8 [SIZE, SIZE, 3] with `lobes` round lobes on a circle, joined by 2 px bridges, and
  the drawn nucleus mask; `granules` is the fraction of cytoplasm pixels painted red-orange."""
  image = _smear(rng)
  body = _disk(32, 32, cell)
  image[body] = CYTOPLASM
  if granules:
    image[body & (rng.random(body.shape) < granules)] = GRANULES
  angles = np.pi / 2 + 2 * np.pi * np.arange(lobes) / lobes if lobes > 2 else [0.0, np.pi]
  ring = 10.0 if lobes > 2 else 8.0
  centres = [(32 + ring * np.sin(a), 32 + ring * np.cos(a)) for a in angles]
  nucleus = np.zeros((SIZE, SIZE), bool)
  for cy, cx in centres:
    nucleus |= _disk(cy, cx, radius)
  # Thin bridges between consecutive lobes, as in a segmented neutrophil's nucleus.
  for (y0, x0), (y1, x1) in zip(centres, centres[1:]):
    for t in np.linspace(0, 1, 40):
      y, x = y0 + t * (y1 - y0), x0 + t * (x1 - x0)
      nucleus[int(round(y)) - 1:int(round(y)) + 1, int(round(x))] = True
  image[nucleus] = NUCLEUS
  return _to_uint8(image + rng.normal(0, 3.0, image.shape)), nucleus


def _iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def _feature(features, name):
  return features[:, floor.FEATURE_NAMES.index(name)]


# ----------------------------------------------------------------------------- segmentation


def test_segment_nucleus_finds_the_drawn_disk():
  rng = np.random.default_rng(0)
  image, nucleus = round_cell(rng, radius=9.0)
  mask = floor.segment_nucleus(image)
  assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
  assert _iou(mask, nucleus) > 0.7


def test_segment_nucleus_keeps_the_central_cell_only():
  rng = np.random.default_rng(1)
  image, nucleus = round_cell(rng, radius=7.0, cell=11.0)
  # A neighbouring white cell's nucleus in the corner, bigger than the central one.
  other = _disk(4, 4, 9.0)
  image[other] = NUCLEUS
  mask = floor.segment_nucleus(image)
  assert _iou(mask, nucleus) > 0.7
  assert not (mask & other).any()


def test_segment_nucleus_off_centre_and_non_square():
  rng = np.random.default_rng(2)
  image, nucleus = round_cell(rng, radius=8.0, centre=(26, 36))
  assert _iou(floor.segment_nucleus(image), nucleus) > 0.7
  wide = np.concatenate([image, image[:, :16]], axis=1)  # [64, 80, 3]
  assert floor.segment_nucleus(wide)[:, :SIZE].sum() == pytest.approx(nucleus.sum(), rel=0.3)


@pytest.mark.parametrize('fill', [0, 230, 255])
def test_segment_nucleus_of_an_image_without_nucleus_is_empty(fill):
  image = np.full((SIZE, SIZE, 3), fill, np.uint8)
  assert not floor.segment_nucleus(image).any()
  red_cells_only = _to_uint8(_smear(np.random.default_rng(3), red_cells=8))
  assert not floor.segment_nucleus(red_cells_only).any()


def test_lobe_counts():
  rng = np.random.default_rng(4)
  two, two_mask = lobed_cell(rng, lobes=2)
  three, _ = lobed_cell(rng, lobes=3)
  round_, _ = round_cell(rng, radius=9.0)
  # The drawn two-lobe nucleus is one connected object: only the erosion parts its lobes.
  from scipy import ndimage
  assert ndimage.label(two_mask)[1] == 1
  assert _iou(floor.segment_nucleus(two), two_mask) > 0.7
  f = floor.nucleus_features(np.stack([two, three, round_]))
  assert _feature(f, 'n_lobes').tolist() == [2, 3, 1]
  # A lobed nucleus is thinner and less convex than a round one.
  assert _feature(f, 'thickness_max')[0] < _feature(f, 'thickness_max')[2]
  assert _feature(f, 'solidity')[0] < _feature(f, 'solidity')[2]


# ----------------------------------------------------------------------------- features


def test_features_are_finite_without_nucleus():
  blank = np.full((3, SIZE, SIZE, 3), 230, np.uint8)
  blank[1] = 0
  blank[2] = 255
  f = floor.nucleus_features(blank)
  assert f.dtype == np.float32 and f.shape == (3, len(floor.FEATURE_NAMES))
  assert np.isfinite(f).all()
  assert (_feature(f, 'area') == 0).all() and (_feature(f, 'n_lobes') == 0).all()


def test_features_measure_what_they_name():
  rng = np.random.default_rng(5)
  small, _ = round_cell(rng, radius=5.0)
  large, _ = round_cell(rng, radius=10.0)
  plain, _ = lobed_cell(rng, lobes=2)
  granular, _ = lobed_cell(rng, lobes=2, granules=0.5)
  f = floor.nucleus_features(np.stack([small, large, plain, granular]))
  assert np.isfinite(f).all()
  area = _feature(f, 'area')
  assert area[0] == pytest.approx(np.pi * 25 / SIZE ** 2, rel=0.35)
  assert area[1] == pytest.approx(np.pi * 100 / SIZE ** 2, rel=0.25)
  assert _feature(f, 'ring_granule')[3] > _feature(f, 'ring_granule')[2] + 0.1
  assert _feature(f, 'ring_rb')[3] > _feature(f, 'ring_rb')[2]
  assert len(set(floor.FEATURE_NAMES)) == len(floor.FEATURE_NAMES)


@pytest.mark.parametrize('bad', [
    np.zeros((2, SIZE, SIZE, 3), np.float32),   # float, not uint8
    np.zeros((SIZE, SIZE, 3), np.uint8),        # one image, no batch axis
    np.zeros((2, SIZE, SIZE, 4), np.uint8),     # RGBA
    np.zeros((2, 4, 4, 3), np.uint8),           # too small to segment
])
def test_wrong_images_raise(bad):
  with pytest.raises(ValueError, match=r'uint8 RGB images \[N, H, W, 3\]|at least 8x8'):
    floor.nucleus_features(bad)


def test_segment_wrong_image_raises():
  with pytest.raises(ValueError, match=r'uint8 RGB image \[H, W, 3\]'):
    floor.segment_nucleus(np.zeros((1, SIZE, SIZE, 3), np.uint8))


# ----------------------------------------------------------------------------- fit and evaluate


def draw_class(rng, label):
  """One synthetic cell of class `label`, told apart by lobes, size and granules."""
  if label == 0:    # eosinophil: two lobes, red-orange granules
    return lobed_cell(rng, lobes=2, radius=rng.uniform(4.5, 5.5), granules=0.4)[0]
  if label == 1:    # lymphocyte: small round nucleus, thin cytoplasm
    return round_cell(rng, radius=rng.uniform(6, 7), cell=9.0)[0]
  if label == 2:    # monocyte: large round nucleus, wide cytoplasm
    return round_cell(rng, radius=rng.uniform(10, 11), cell=16.0)[0]
  return lobed_cell(rng, lobes=3, radius=rng.uniform(4.5, 5.5))[0]  # neutrophil


def synthetic_set(seed=0, per_class=20):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(4), per_class).astype(np.int32)
  images = np.stack([draw_class(rng, y) for y in labels])
  examples = ip.Examples(images, labels, np.arange(len(labels), dtype=np.int32) + 1000,
                         CLASS_NAMES)
  # Per class: the first 10 images train, the next 5 validate, the last 5 test.
  k = np.arange(len(labels)) % per_class
  split = ip.Split('synthetic', np.flatnonzero(k < 10), np.flatnonzero((k >= 10) & (k < 15)),
                   np.flatnonzero(k >= 15))
  return examples, split


def _config():
  return ml_collections.ConfigDict({'seed': 3})


@pytest.fixture(scope='module')
def floor_run(tmp_path_factory):
  examples, split = synthetic_set()
  workdir = str(tmp_path_factory.mktemp('floor') / 'run')
  results = floor.train_and_evaluate(_config(), workdir, examples=examples, split=split,
                                     log=lambda *a: None)
  return examples, split, workdir, results


def test_train_and_evaluate_schema(floor_run):
  examples, split, workdir, results = floor_run
  for key in ('model', 'split', 'seeds', 'best_epoch', 'best_val_accuracy', 'num_params',
              'n_train_real', 'n_train_extra', 'class_names', 'train_seconds', 'splits',
              'majority_baseline', 'floor'):
    assert key in results, key
  assert results['model'] == 'floor' and results['split'] == 'synthetic'
  assert results['seeds'] == [3] and results['best_epoch'] == [0]
  assert results['n_train_real'] == 40 and results['n_train_extra'] == 0
  assert results['class_names'] == list(CLASS_NAMES)
  assert results['num_params'] > 0
  chosen = results['floor']['chosen']
  scores = results['floor']['val_balanced_accuracy']
  assert chosen in scores and set(scores) == set(floor.candidates(0))
  assert scores[chosen] == max(scores.values())
  val = results['splits']['val']
  assert results['best_val_accuracy'] == [val['per_seed'][0]['accuracy']]
  for name, n in (('train', 40), ('val', 20), ('test', 20)):
    s = results['splits'][name]
    assert len(s['per_seed']) == 1 and s['ensemble']['n'] == n
    assert s['ensemble'] == s['per_seed'][0]  # one seed: the ensemble is that seed
  json.dumps(results)  # results.json's contents must serialise as they are


def test_train_and_evaluate_files(floor_run):
  examples, split, workdir, results = floor_run
  for name in ('config.json', 'predictions.npz', 'metrics.jsonl', 'confusion_test.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['seed'] == 3
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert len(rows) == 1 and rows[0]['chosen'] == results['floor']['chosen']
  p = np.load(os.path.join(workdir, 'predictions.npz'))
  assert set(p.files) == {'val_probs', 'val_labels', 'val_image_ids', 'test_probs',
                          'test_labels', 'test_image_ids'}
  for name in ('val', 'test'):
    idx = getattr(split, name)
    assert p[f'{name}_probs'].shape == (1, len(idx), 4)
    np.testing.assert_allclose(p[f'{name}_probs'].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(p[f'{name}_labels'], examples.labels[idx])
    np.testing.assert_array_equal(p[f'{name}_image_ids'], examples.image_ids[idx])
  cm = np.asarray(results['splits']['test']['ensemble']['confusion_matrix'])
  np.testing.assert_array_equal(
      cm.diagonal().sum(), (p['test_probs'][0].argmax(-1) == p['test_labels']).sum())


def test_train_and_evaluate_beats_the_majority(floor_run):
  _, _, _, results = floor_run
  test = results['splits']['test']['ensemble']
  majority = results['majority_baseline']
  assert majority['balanced_accuracy'] == pytest.approx(0.25)
  assert test['balanced_accuracy'] >= 0.8 > majority['balanced_accuracy']
  assert test['accuracy'] > majority['accuracy']


def test_test_images_do_not_influence_the_choice(floor_run, tmp_path):
  examples, split, workdir, results = floor_run
  # Replace every test image by a cell of the next class, its label kept: every candidate now
  # fails the test split. A pipeline that fitted or selected on anything of the test split
  # would move the validation numbers or the candidates' scores.
  rng = np.random.default_rng(9)
  images = examples.images.copy()
  for i in split.test:
    images[i] = draw_class(rng, (examples.labels[i] + 1) % 4)
  changed = ip.Examples(images, examples.labels, examples.image_ids, CLASS_NAMES)
  again = floor.train_and_evaluate(_config(), str(tmp_path), examples=changed, split=split,
                                   log=lambda *a: None)
  assert again['floor'] == results['floor']
  assert again['splits']['val'] == results['splits']['val']
  np.testing.assert_array_equal(np.load(os.path.join(str(tmp_path), 'predictions.npz'))
                                ['val_probs'],
                                np.load(os.path.join(workdir, 'predictions.npz'))['val_probs'])
  # The test split itself did change (so the comparison above could have failed).
  assert again['splits']['test']['ensemble']['accuracy'] < 0.5
  assert results['splits']['test']['ensemble']['accuracy'] > 0.8


def test_extra_images_join_training_only(floor_run, tmp_path):
  examples, split, _, results = floor_run
  rng = np.random.default_rng(11)
  extra_y = np.array([1, 2] * 4, np.int32)
  extra_x = np.stack([draw_class(rng, y) for y in extra_y])
  out = floor.train_and_evaluate(_config(), str(tmp_path), examples=examples, split=split,
                                 extra=(extra_x, extra_y), log=lambda *a: None)
  assert out['n_train_extra'] == 8 and out['n_train_real'] == 40
  # The reported training split stays the real training images.
  assert out['splits']['train']['ensemble']['n'] == 40
  assert out['splits']['test']['ensemble']['n'] == 20


def test_a_single_training_class_raises(tmp_path):
  examples, split = synthetic_set(per_class=20)
  one_class = ip.Split('bad', split.train[examples.labels[split.train] == 3], split.val,
                       split.test)
  with pytest.raises(ValueError, match='at least two classes'):
    floor.train_and_evaluate(_config(), str(tmp_path), examples=examples, split=one_class,
                             log=lambda *a: None)
