"""A collection of one folder per class (wbc_jax.folder_data) in place of BCCD."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from wbc_jax import folder_data
from wbc_jax import input_pipeline as ip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('BASOPHIL', 'LYMPHOCYTE', 'NEUTROPHIL')
XML = ('<annotation><object><name>WBC</name><bndbox><xmin>8</xmin><ymin>4</ymin><xmax>40</xmax>'
       '<ymax>36</ymax></bndbox></object></annotation>')


def _make_collection(root, per_class=8, hw=(48, 64)):
  rng = np.random.default_rng(0)
  for c, name in enumerate(CLASSES):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      # Each class its own tint, so a classifier has something to learn.
      image = rng.integers(0, 80, (*hw, 3)) + np.array([60 * c, 120, 200 - 60 * c])
      data = tf.io.encode_png(np.clip(image, 0, 255).astype(np.uint8)).numpy()
      (root / name / f'img{i:02d}.png').write_bytes(data)
  (root / CLASSES[0] / 'img00.xml').write_text(XML)
  (root / CLASSES[0] / 'readme.txt').write_text('not an image; ignored')
  return root


def test_a_folder_per_class_loads_like_bccd(tmp_path):
  raw = folder_data.load(str(_make_collection(tmp_path / 'c')))
  assert raw['class_names'] == CLASSES
  assert raw['images'].shape == (24, 48, 64, 3) and raw['images'].dtype == np.uint8
  np.testing.assert_array_equal(raw['labels'], np.repeat([0, 1, 2], 8))
  np.testing.assert_array_equal(raw['image_ids'], np.arange(24))
  # The VOC file's WBC box, normalised; no file: the whole image is the cell.
  np.testing.assert_allclose(raw['boxes'][0], [[4 / 48, 8 / 64, 36 / 48, 40 / 64]], rtol=1e-6)
  np.testing.assert_array_equal(raw['boxes'][1], [[0, 0, 1, 1]])
  # The pipeline's views come out of it as out of BCCD.
  data = ml_data_config(str(tmp_path / 'c'), view='crop')
  examples = ip.load_examples(data)
  assert examples.images.shape == (24, 24, 24, 3)
  assert len(ip.make_splits(examples.labels, split_config())) == 1


def ml_data_config(folder, view='crop', classes=()):
  import ml_collections
  return ml_collections.ConfigDict(dict(
      name='folder', folder=folder, folder_classes=classes, data_dir='', manual_dir='',
      view=view, frame_size=(24, 32), crop_size=24, crop_margin=0.25, crop_mode='box',
      window_px=32))


def split_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(protocol='holdout', split_seed=0, test_fraction=0.15,
                                        val_fraction=0.15, folds=5, repeats=1))


@pytest.mark.parametrize('problem,message', [
    ('missing', 'no such directory'),
    ('one_class', '1 class folder'),
    ('empty_class', 'no images'),
    ('unreadable', 'not a readable image'),
    ('other_size', 'every image of a collection must have one size'),
    ('classes', 'differ from config.data.folder_classes'),
])
def test_a_bad_collection_gets_an_error_naming_the_path(tmp_path, problem, message):
  root = _make_collection(tmp_path / problem)
  classes = ()
  if problem == 'missing':
    root = tmp_path / 'nowhere'
  elif problem == 'one_class':
    for name in CLASSES[1:]:
      for f in (root / name).iterdir():
        f.unlink()
      (root / name).rmdir()
  elif problem == 'empty_class':
    for f in (root / CLASSES[2]).iterdir():
      f.unlink()
  elif problem == 'unreadable':
    (root / CLASSES[1] / 'img03.png').write_bytes(b'\x89PNG broken')
  elif problem == 'other_size':
    (root / CLASSES[2] / 'img05.png').write_bytes(
        tf.io.encode_png(np.zeros((40, 64, 3), np.uint8)).numpy())
  elif problem == 'classes':
    classes = ('EOSINOPHIL', 'LYMPHOCYTE', 'NEUTROPHIL')
  with pytest.raises(folder_data.FolderDataError, match=message) as info:
    folder_data.load(str(root), classes)
  where = {'empty_class': CLASSES[2], 'unreadable': 'img03.png', 'other_size': 'img05.png'}
  assert where.get(problem, str(root) if problem != 'missing' else 'nowhere') in str(info.value)


@pytest.mark.slow
def test_the_baseline_config_trains_on_a_folder_collection(tmp_path):
  root = _make_collection(tmp_path / 'collection')
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'wbc_jax.main', '--config=configs/baseline.py:test',
         f'--workdir={workdir}', '--config.data.name=folder', f'--config.data.folder={root}',
         "--config.ablation.views=('crop',)", "--config.ablation.models=('cellnet',)"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.load(open(workdir / 'crop' / 'holdout' / 'original_trad' / 'cellnet' /
                           'results.json'))
  assert results['class_names'] == list(CLASSES)
  assert results['splits']['test']['ensemble']['n'] == 4
