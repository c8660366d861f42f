"""The WBC localiser: targets, decoding, the classical baseline, scoring, saving."""

import ml_collections
import numpy as np
import pytest

from wbc_jax import localise


def _logit(p):
  return np.log(p / (1 - p))


def _frame_with_cell(cy, cx, radius, hw=(96, 128), seed=0):
  """A pale smear with pink red cells and one WBC: violet nucleus inside a paler cytoplasm."""
  rng = np.random.default_rng(seed)
  h, w = hw
  frame = np.full((h, w, 3), (225, 215, 220), np.float32) + rng.normal(0, 3, (h, w, 3))
  yy, xx = np.mgrid[:h, :w]
  for _ in range(6):  # red cells: R above B, never violet
    ry, rx = rng.uniform(0, h), rng.uniform(0, w)
    frame[np.hypot(yy - ry, xx - rx) < 7] = (215, 150, 160)
  d = np.hypot(yy - cy, xx - cx)
  frame[d < radius] = (200, 185, 215)          # cytoplasm
  frame[d < 0.6 * radius] = (95, 60, 165)      # nucleus: B well above (R + G) / 2
  box = np.array([(cy - radius) / h, (cx - radius) / w, (cy + radius) / h, (cx + radius) / w],
                 np.float32)
  return np.clip(frame, 0, 255).astype(np.uint8), box


def test_targets_put_one_centre_per_box_with_its_size_and_offset():
  box = np.array([[0.25, 0.5, 0.75, 0.75]], np.float32)  # centre (0.5, 0.625), 0.5 x 0.25
  t = localise.make_targets([box], (30, 40))
  assert t['mask'].sum() == 1
  iy, ix = np.argwhere(t['mask'][0])[0]
  assert (iy, ix) == (15, 25)
  assert t['heat'][0, iy, ix] == 1.0 and t['heat'][0].max() == 1.0
  assert np.sum(t['heat'][0] == 1.0) == 1
  np.testing.assert_allclose(np.exp(t['size'][0, iy, ix]), [15.0, 10.0], rtol=1e-6)
  np.testing.assert_allclose(t['offset'][0, iy, ix], [0.0, 0.0], atol=1e-6)
  # The Gaussian falls off away from the centre.
  assert t['heat'][0, iy, ix + 3] < t['heat'][0, iy, ix + 1] < 1.0


def test_decode_inverts_the_targets():
  boxes = [np.array([[0.1, 0.2, 0.5, 0.45], [0.6, 0.6, 0.9, 0.95]], np.float32),
           np.array([[0.3, 0.3, 0.7, 0.6]], np.float32)]
  grid = (30, 40)
  t = localise.make_targets(boxes, grid)
  out = np.zeros((2, *grid, 5), np.float32)
  out[..., 0] = np.where(t['mask'] > 0, _logit(0.9), _logit(0.01))
  out[..., 1:3] = t['size']
  out[..., 3:5] = _logit(np.clip(t['offset'], 1e-4, 1 - 1e-4))
  found = localise.decode(out, threshold=0.3)
  assert [len(f.boxes) for f in found] == [2, 1]
  for f, b in zip(found, boxes):
    iou = localise.box_iou(f.boxes, b)
    np.testing.assert_allclose(iou.max(axis=1), 1.0, atol=1e-3)
  # Nothing above threshold: the best peak comes back with its low score.
  out[..., 0] = _logit(0.01)
  low = localise.decode(out, threshold=0.3)
  assert all(len(f.scores) == 1 and f.scores[0] < 0.3 for f in low)


def test_flip_boxes_follows_the_flipped_image():
  frame, box = _frame_with_cell(30, 40, 12)
  classical = localise.ClassicalLocaliser((48, 64), scale=1.0 / 0.6)
  flipped = frame[::-1, ::-1]
  want = localise.flip_boxes(box, vertical=True, horizontal=True)
  got = classical.detect(flipped[None])[0].boxes
  assert localise.box_iou(got, want)[0, 0] > 0.6
  np.testing.assert_allclose(localise.flip_boxes(want, True, True), box[None], atol=1e-6)


def test_classical_localiser_fits_the_cytoplasm_scale_and_finds_the_cell():
  train = [_frame_with_cell(30 + 5 * i, 40 + 9 * i, 14, seed=i) for i in range(4)]
  classical = localise.fit_classical(np.stack([f for f, _ in train]),
                                     [b[None] for _, b in train], input_hw=(96, 128))
  # Nucleus radius 0.6 x the cell's: the box must grow by about 1 / 0.6.
  assert 1.45 < classical.scale < 1.9
  frame, box = _frame_with_cell(60, 90, 16, seed=9)
  det = classical.detect(frame[None])[0]
  assert localise.box_iou(det.boxes, box)[0, 0] > 0.7
  # A frame with nothing violet: nothing found.
  empty = np.full((1, 96, 128, 3), 220, np.uint8)
  assert len(classical.detect(empty)[0].boxes) == 0


def test_score_detections_counts_hits_misses_and_several():
  truth = [np.array([[0.2, 0.2, 0.6, 0.6]]), np.array([[0.2, 0.2, 0.6, 0.6]]),
           np.array([[0.2, 0.2, 0.6, 0.6]]), np.zeros((0, 4))]
  d = localise.Detections
  found = [d(np.array([[0.22, 0.2, 0.62, 0.6]]), np.array([0.9])),            # hit
           d(np.array([[0.6, 0.6, 0.9, 0.9], [0.2, 0.2, 0.6, 0.6]]), np.array([0.8, 0.5])),
           d(np.array([[0.2, 0.2, 0.6, 0.6]]), np.array([0.1])),              # below threshold
           d(np.array([[0.2, 0.2, 0.6, 0.6]]), np.array([0.9]))]              # no truth: skipped
  s = localise.score_detections(found, truth, threshold=0.3, frame_hw=(100, 100))
  assert s['frames'] == 3
  assert [r['hit'] for r in s['rows']] == [True, False, False]  # the top detection decides
  assert s['none_found'] == 1 and s['several_found'] == 1
  assert s['rows'][0]['centre_px'] == pytest.approx(2.0)
  assert s['hit_rate'] == pytest.approx(1 / 3)


TINY_LOCALISER = dict(input_hw=(48, 64), width=8, steps=3, batch_size=4, learning_rate=1e-3,
                      weight_decay=0.0, threshold=0.3)


def _small_frames(n, step):
  """n 48x64 frames, the cell moving by `step` pixels each; and their boxes [1, 4]."""
  pairs = [_frame_with_cell(20 + step[0] * i, 25 + step[1] * i, 10, hw=(48, 64), seed=i)
           for i in range(n)]
  return [f for f, _ in pairs], [b[None] for _, b in pairs]


def test_fit_save_load_detect_round_trip(tmp_path):
  frames, boxes = _small_frames(6, step=(4, 6))
  cfg = ml_collections.ConfigDict(TINY_LOCALISER)
  lines = []
  net = localise.fit_localiser(np.stack(frames), boxes, cfg, log=lines.append)
  assert any('localiser step' in line for line in lines)
  net.save(str(tmp_path))
  again = localise.Localiser.load(str(tmp_path))
  a, b = localise.detect(net, np.stack(frames)), localise.detect(again, np.stack(frames))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.boxes, y.boxes)
    np.testing.assert_array_equal(x.scores, y.scores)
  with pytest.raises(FileNotFoundError, match='localiser.json'):
    localise.Localiser.load(str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='input_hw'):
    localise.downscale(np.stack(frames), (50, 64))


def test_a_split_localiser_never_sees_validation_or_test_boxes(tmp_path):
  from wbc_jax import input_pipeline as ip
  from wbc_jax import located
  frames, boxes = _small_frames(8, step=(3, 5))
  raw = {'images': np.stack(frames), 'boxes': boxes, 'image_ids': np.arange(8)}
  split = ip.Split('s', train=np.arange(5), val=np.array([5]), test=np.array([6, 7]))
  config = ml_collections.ConfigDict(dict(seed=0, localiser=TINY_LOCALISER))
  moved = dict(raw, boxes=boxes[:5] + [np.array([[0.0, 0.0, 0.2, 0.2]], np.float32)] * 3)
  a = located.fit_or_load(config, str(tmp_path / 'a'), raw, split, log=lambda s: None)
  b = located.fit_or_load(config, str(tmp_path / 'b'), moved, split, log=lambda s: None)
  for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  # ... while a changed training box does change the fit.
  shifted = dict(raw, boxes=[np.array([[0.0, 0.0, 0.2, 0.2]], np.float32)] * 5 + boxes[5:])
  c = located.fit_or_load(config, str(tmp_path / 'c'), shifted, split, log=lambda s: None)
  assert any(not np.array_equal(x, y) for x, y in zip(jax_leaves(a.params),
                                                      jax_leaves(c.params)))
  # Read back from its directory, not fitted again.
  again = located.fit_or_load(config, str(tmp_path / 'a'), moved, split,
                              log=lambda s: pytest.fail(f'fitted again: {s}'))
  for x, y in zip(jax_leaves(a.params), jax_leaves(again.params)):
    np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_located_view_needs_the_crop_view_first_and_real_image_regimes():
  from wbc_jax import located
  deep = ('cnn', 'cellnet')
  located.check_views(('crop', 'located'), ('cellnet', 'floor'), deep)
  located.check_views(('located',), ('floor',), deep)      # the floor is refitted: no crop run
  for views in (('located',), ('located', 'crop')):
    with pytest.raises(ValueError, match="list 'crop' first"):
      located.check_views(views, ('cellnet',), deep)
  with pytest.raises(ValueError, match='drop original\\+gan'):
    located.check_views(('crop', 'located'), ('cellnet',), deep, ['original+gan'])


@pytest.mark.slow
def test_localiser_cv_script_writes_its_table(test_config, tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, 'scripts/localiser_cv.py', '--config=configs/baseline.py:test',
         f'--config.data.manual_dir={test_config.data.manual_dir}',
         f'--config.data.data_dir={test_config.data.data_dir}', '--max_splits=1',
         f'--workdir={tmp_path / "work"}', f'--out={tmp_path / "out"}']
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.load(open(tmp_path / 'out' / 'results.json'))
  assert results['summary']['network']['frames'] == 44   # the holdout split's test frames
  assert '| network (wbc_jax.localise.CentreNet) | 44 |' in open(tmp_path / 'out' /
                                                              'README.md').read()
  # Missing flags: a usage error, no files.
  proc = subprocess.run([sys.executable, 'scripts/localiser_cv.py'], cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and '--workdir' in proc.stderr
