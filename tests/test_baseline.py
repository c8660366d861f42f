"""The strong-baseline recipe: window crops, training-only statistics, in-step augmentation,
balanced sampling, selection, test-time augmentation, and the config end to end."""

import csv
import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import config_sections
from wbc_jax import augment
from wbc_jax import evaluation
from wbc_jax import input_pipeline as ip
from wbc_jax import models
from wbc_jax import rundir
from wbc_jax import train
from wbc_jax import training_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- window crops


def _frames_with_cells(radii, centres, hw=(480, 640)):
  """Pale frames, each with one dark disk of the given radius at the given centre."""
  frames = np.full((len(radii), *hw, 3), 220, np.uint8)
  yy, xx = np.mgrid[:hw[0], :hw[1]]
  boxes = []
  for f, r, (cy, cx) in zip(frames, radii, centres):
    f[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 40
    boxes.append(np.array([[(cy - r) / hw[0], (cx - r) / hw[1],
                            (cy + r) / hw[0], (cx + r) / hw[1]]]))
  return frames, boxes


def _view(frames, boxes, **data):
  config = ml_collections.ConfigDict({'view': 'crop', 'crop_size': 64, 'crop_margin': 0.25,
                                      'crop_mode': 'window', 'window_px': 288, **data})
  raw = {'images': frames, 'labels': np.zeros(len(frames), np.int32),
         'image_ids': np.arange(len(frames), dtype=np.int32), 'boxes': boxes,
         'class_names': ('a',)}
  return ip.make_view(raw, config).images


def test_window_crop_keeps_cell_size():
  frames, boxes = _frames_with_cells([40, 80], [(240, 200), (200, 400)])
  dark = lambda images: (images.mean(-1) < 128).sum(axis=(1, 2))
  small, large = dark(_view(frames, boxes))
  # Areas scale with the squared radius: 4x, up to the edge pixels of a 64 px rendering.
  assert 3.3 < large / small < 4.7
  # The per-box crop scales both cells to fill it: the same area.
  small_box, large_box = dark(_view(frames, boxes, crop_mode='box'))
  assert abs(large_box / small_box - 1) < 0.1


def test_window_crop_is_centred_on_the_cell_near_the_edge():
  frames, boxes = _frames_with_cells([30], [(35, 40)])
  image = _view(frames, boxes)[0]
  ys, xs = np.nonzero(image.mean(-1) < 128)
  # The cell sits in the middle of the window; the smear is mirrored past the frame edge,
  # so the mirrored copy of the cell lies away from the centre.
  centre = np.array([31.5, 31.5])
  near = np.hypot(ys - centre[0], xs - centre[1]) < 10
  assert near.sum() > 0.9 * np.pi * (30 * 64 / 288) ** 2 * 0.3
  np.testing.assert_allclose([ys[near].mean(), xs[near].mean()], centre, atol=1.0)


def test_unknown_crop_mode_names_the_field():
  frames, boxes = _frames_with_cells([30], [(200, 200)])
  with pytest.raises(ValueError, match='config.data.crop_mode'):
    _view(frames, boxes, crop_mode='tight')


# ----------------------------------------------------------------------------- augmentation


def test_d4_views_are_the_8_distinct_pixel_permutations():
  image = jax.random.uniform(jax.random.PRNGKey(0), (6, 6, 3))
  views = augment.d4_views(image[None])[:, 0]
  assert views.shape == (8, 6, 6, 3)
  flat = np.asarray(views).reshape(8, -1)
  for v in flat:  # the same multiset of values: a permutation of the pixels
    np.testing.assert_array_equal(np.sort(v), np.sort(np.asarray(image).ravel()))
  assert len({v.tobytes() for v in flat}) == 8
  # The group is closed under numpy's own rotations and flips.
  x = np.asarray(image)
  expected = [x, x[::-1], x[:, ::-1], np.rot90(x, 2), x.swapaxes(0, 1), np.rot90(x, 1),
              np.rot90(x, -1), np.rot90(x, 2).swapaxes(0, 1)]
  assert {e.tobytes() for e in expected} == {v.tobytes() for v in np.asarray(views)}


def test_flip_and_rot90_augmentation_draws_d4_elements_and_keeps_shapes():
  spec = augment.AugmentSpec(hflip=True, vflip=True, rot90=True)
  images = jax.random.uniform(jax.random.PRNGKey(1), (64, 8, 8, 3))
  out = augment.augment_batch(images, jax.random.PRNGKey(2), spec)
  assert out.shape == images.shape and out.dtype == images.dtype
  views = np.asarray(augment.d4_views(images))  # [8, B, ...]
  hits = [[np.array_equal(np.asarray(out[b]), views[k, b]) for k in range(8)]
          for b in range(len(images))]
  assert all(sum(h) == 1 for h in hits)
  drawn = {int(np.argmax(h)) for h in hits}
  assert len(drawn) >= 6  # 64 draws from 8 elements: all but a few appear


def test_geometric_augmentation_without_change_is_the_identity():
  image = jax.random.uniform(jax.random.PRNGKey(3), (9, 9, 3))
  same = augment.affine_resample(image, jnp.eye(2), jnp.zeros(2))
  np.testing.assert_allclose(same, image, atol=1e-6)
  # A quarter turn by the resampler equals the exact rotation.
  quarter = augment.affine_resample(image, jnp.array([[0.0, 1.0], [-1.0, 0.0]]), jnp.zeros(2))
  np.testing.assert_allclose(quarter, np.rot90(np.asarray(image), 1), atol=1e-5)
  # A shift past the border reads the mirrored image, never a constant fill.
  shifted = np.asarray(augment.affine_resample(image, jnp.eye(2), jnp.array([0.0, 2.0])))
  np.testing.assert_allclose(shifted[:, -1], np.asarray(image)[:, -3], atol=1e-6)


def test_full_augmentation_stays_in_range_and_differs_per_image():
  spec = augment.AugmentSpec(hflip=True, vflip=True, rot90=True, rotation_deg=180, scale=0.1,
                             shift=0.05, brightness=0.1, contrast=0.15, saturation=0.15,
                             hue=0.02)
  images = jnp.broadcast_to(jax.random.uniform(jax.random.PRNGKey(4), (16, 16, 3)),
                            (4, 16, 16, 3))
  out = np.asarray(augment.augment_batch(images, jax.random.PRNGKey(5), spec))
  assert out.min() >= 0 and out.max() <= 1
  assert len({o.tobytes() for o in out}) == 4


def test_tfdata_refuses_fields_only_jax_has():
  aug = config_sections.section('augment', scale=0.1)
  with pytest.raises(ValueError, match='config.augment.scale'):
    augment.check_impl('tfdata', aug)
  with pytest.raises(ValueError, match='config.augment.impl'):
    augment.check_impl('cuda', aug)


# ----------------------------------------------------------------------------- sampling


def test_balanced_sampler_draws_each_class_equally_often():
  labels = np.array([0] * 170 + [1] * 70 + [2] * 25 + [3] * 15)
  order = np.concatenate([ip.balanced_epoch_indices(labels, 32, 50, seed=0, epoch=e)
                          for e in range(4)])
  freq = np.bincount(labels[order.ravel()], minlength=4) / order.size
  # 6,400 draws, p = 0.25: the standard error is 0.0054; 4 of them is a failing bound.
  np.testing.assert_allclose(freq, 0.25, atol=0.022)
  # Within a class, every image is drawn before any repeats (in one epoch's walk).
  first = ip.balanced_epoch_indices(labels, 32, 50, seed=0, epoch=0).ravel()
  minority = first[labels[first] == 3]
  assert len(set(minority[:15].tolist())) == 15
  # The uniform order follows the class counts instead.
  uniform = ip.epoch_indices(len(labels), 28, seed=0, epoch=0)
  np.testing.assert_allclose(np.bincount(labels[uniform.ravel()], minlength=4) / uniform.size,
                             np.bincount(labels) / len(labels), atol=0.01)


def test_uniform_epochs_of_fixed_length_take_as_many_passes_as_needed(test_config):
  labels = np.arange(32) % 4
  images = np.zeros((32, 4, 4, 3), np.uint8)
  kw = dict(seeds=[0], epoch=3, batch_size=8, aug=test_config.augment, augment=False,
            sampling='uniform')
  one_pass = ip.train_batches(images, labels, **kw)
  assert len(one_pass) == 4
  long = ip.train_batches(images, labels, max_steps=18, steps=18, **kw)
  assert len(long) == 18  # train.steps_per_epoch is honoured, not cut at one pass
  # 18 batches of 8 are 4.5 passes over 32 images: every class at least 4 x 8 times.
  counts = np.bincount(np.concatenate([b['label'].ravel() for b in long]), minlength=4)
  assert counts.sum() == 144 and counts.min() >= 32
  # The first pass is the epoch's one-pass order: short epochs are unchanged.
  np.testing.assert_array_equal(long[0]['label'], one_pass[0]['label'])
  assert sorted(ip.epoch_indices(32, 8, 0, 3, part=1).ravel()) == list(range(32))
  assert not np.array_equal(ip.epoch_indices(32, 8, 0, 3), ip.epoch_indices(32, 8, 0, 3, part=1))


def test_sqrt_sampler_draws_classes_by_the_root_of_their_counts():
  labels = np.array([0] * 144 + [1] * 64 + [2] * 25 + [3] * 16)
  order = np.concatenate([ip.balanced_epoch_indices(labels, 32, 50, seed=1, epoch=e, power=0.5)
                          for e in range(4)])
  freq = np.bincount(labels[order.ravel()], minlength=4) / order.size
  # sqrt counts 12 : 8 : 5 : 4 -> 0.414, 0.276, 0.172, 0.138; SE <= 0.0062 over 6,400 draws.
  np.testing.assert_allclose(freq, np.array([12, 8, 5, 4]) / 29, atol=0.025)
  # Through train_batches, by name.
  images = np.zeros((len(labels), 4, 4, 3), np.uint8)
  batches = ip.train_batches(images, labels, seeds=[0], epoch=0, batch_size=32,
                             aug=ml_collections.ConfigDict({}), augment=False, sampling='sqrt',
                             steps=50)
  got = np.bincount(np.concatenate([b['label'].ravel() for b in batches]), minlength=4) / 1600
  np.testing.assert_allclose(got, np.array([12, 8, 5, 4]) / 29, atol=0.04)


def test_balanced_batches_follow_the_sampler(test_config):
  labels = np.array([0] * 30 + [1] * 2)
  images = np.zeros((32, 4, 4, 3), np.uint8)
  batches = ip.train_batches(images, labels, seeds=[0, 1], epoch=0, batch_size=16,
                             aug=test_config.augment, augment=False, sampling='balanced',
                             steps=20)
  got = np.concatenate([b['label'].ravel() for b in batches])
  assert len(batches) == 20 and abs(got.mean() - 0.5) < 0.06
  with pytest.raises(ValueError, match='config.train.sampling'):
    ip.train_batches(images, labels, seeds=[0], epoch=0, batch_size=16,
                     aug=test_config.augment, augment=False, sampling='weighted')


# ----------------------------------------------------------------------------- selection, TTA


def test_selection_rules():
  row = {'epoch': 7, 'val_acc': [0.5, 0.9], 'val_bacc': [0.7, 0.4], 'val_loss': [1.0, 0.2],
         'test_acc': [1.0, 0.0]}
  np.testing.assert_allclose(evaluation.selection_score('val_accuracy', row), [0.5, 0.9])
  np.testing.assert_allclose(evaluation.selection_score('val_balanced_accuracy', row), [0.7, 0.4])
  np.testing.assert_allclose(evaluation.selection_score('val_loss', row), [-1.0, -0.2])
  np.testing.assert_array_equal(evaluation.selection_score('last', row), [7, 7])
  # The test metrics never enter a score.
  other = dict(row, test_acc=[0.0, 1.0])
  for rule in evaluation.SELECTIONS:
    np.testing.assert_array_equal(evaluation.selection_score(rule, row),
                                  evaluation.selection_score(rule, other))
  with pytest.raises(ValueError, match='config.train.select'):
    evaluation.selection_score('test_accuracy', row)


def _tiny_state(ema=False):
  model = models.get_model('cellnet', num_classes=4, conv_impl='xla')
  tx = train.make_optimizer(config_sections.section('train', optimizer='adam',
                                                    learning_rate=1e-3))
  state = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                   image_shape=(16, 16, 3), ema=ema)
  return model, tx, state


def test_select_best_keeps_the_first_best_and_last_keeps_the_end():
  _, _, state = _tiny_state(ema=True)
  marked = lambda s, v: s.replace(ema_params=jax.tree.map(lambda a: a * 0 + v, s.ema_params),
                                  epoch=jnp.int32(v))
  for epoch, score in ((1, 0.5), (2, 0.8), (3, 0.8), (4, 0.6)):
    state = evaluation.select_best(marked(state, epoch), jnp.float32(score))
  assert int(state.best_epoch) == 2
  leaf = jax.tree.leaves(state.best_params)[0]
  np.testing.assert_array_equal(leaf, 2)  # the moving average's weights, not the raw ones
  for epoch in (5, 6):
    state = evaluation.select_best(marked(state, epoch), jnp.float32(epoch))
  assert int(state.best_epoch) == 6


def test_tta_is_the_mean_of_the_8_explicit_views():
  model, _, state = _tiny_state()
  images = jax.random.uniform(jax.random.PRNGKey(6), (3, 16, 16, 3))
  norm = (jnp.array([0.5, 0.4, 0.3]), jnp.array([0.2, 0.25, 0.3]), jnp.zeros(4))
  tta = train.predict_step(state.params, state.batch_stats, images, norm, model=model, tta=True)
  views = [train.predict_step(state.params, state.batch_stats,
                              jax.vmap(lambda x, k=k: augment.d4(x, jnp.int32(k)))(images), norm,
                              model=model) for k in range(8)]
  np.testing.assert_allclose(tta, np.mean(views, axis=0), atol=1e-6)
  assert not np.allclose(views[0], views[5], atol=1e-4)  # the views do differ


@pytest.mark.parametrize('tta', [False, True])
def test_prior_correction_multiplies_by_the_prior_to_the_tau(tta):
  model, _, state = _tiny_state()
  images = jax.random.uniform(jax.random.PRNGKey(7), (5, 16, 16, 3))
  mean, std = jnp.array([0.5, 0.4, 0.3]), jnp.array([0.2, 0.25, 0.3])
  labels = np.array([0] * 6 + [1] * 3 + [2] + [3] * 10)
  bias = training_set.prior_log_bias(labels, 4, 0.25)
  np.testing.assert_allclose(bias, 0.25 * np.log([6 / 20, 3 / 20, 1 / 20, 10 / 20]), rtol=1e-6)
  plain = train.predict_step(state.params, state.batch_stats, images, (mean, std, jnp.zeros(4)),
                             model=model, tta=tta)
  fixed = train.predict_step(state.params, state.batch_stats, images, (mean, std, bias),
                             model=model, tta=tta)
  expected = np.asarray(plain) * np.array([6, 3, 1, 10]) ** 0.25
  np.testing.assert_allclose(fixed, expected / expected.sum(-1, keepdims=True), atol=1e-6)
  assert not np.allclose(fixed, plain, atol=1e-3)


def test_fit_on_train_and_val_needs_a_fixed_schedule():
  split = ip.Split(name='s', train=np.array([0, 1, 2]), val=np.array([3, 4]), test=np.array([5]))
  tc = config_sections.section('train', fit_on='train', select='val_loss')
  np.testing.assert_array_equal(training_set.fit_indices(split, tc), [0, 1, 2])
  tc.fit_on, tc.select = 'train+val', 'last'
  np.testing.assert_array_equal(training_set.fit_indices(split, tc), [0, 1, 2, 3, 4])
  tc.select = 'val_loss'
  with pytest.raises(ValueError, match="select must be 'last'"):
    training_set.fit_indices(split, tc)
  tc.fit_on = 'everything'
  with pytest.raises(ValueError, match="fit_on: unknown value 'everything'"):
    training_set.fit_indices(split, tc)


def test_loss_constants():
  tc = config_sections.section('train', class_weighting=False, logit_adjust_tau=1.0)
  consts = training_set.loss_constants(np.array([0, 0, 0, 1]), 3, tc)
  np.testing.assert_allclose(consts['logit_offset'][:2], np.log([0.75, 0.25]), rtol=1e-6)
  np.testing.assert_array_equal(consts['class_weights'], 1.0)
  tc.logit_adjust_tau = 0.0
  np.testing.assert_array_equal(training_set.loss_constants(np.array([0, 1]), 3, tc)['logit_offset'], 0)


def test_baseline_config_crop_mode_options():
  from configs import baseline
  assert baseline.get_config('cv').data.crop_mode == 'box'  # the validation-chosen default
  assert baseline.get_config('cv,box').data.crop_mode == 'box'
  assert baseline.get_config('quick,window').data.crop_mode == 'window'
  assert baseline.get_config('cv,paper_models').ablation.models == ('cnn', 'cnn_rnn')
  for bad, message in (('cv,box,window', 'two crop modes'), ('cv,wide', "'cv,wide'"),
                       ('box', 'expected one of')):
    with pytest.raises(ValueError, match=message):
      baseline.get_config(bad)


# ----------------------------------------------------------------------------- end to end


def _baseline_config(test_config, **train_fields):
  from configs import baseline
  config = baseline.get_config('test')
  with config.unlocked():
    config.data.manual_dir = test_config.data.manual_dir
    config.data.data_dir = test_config.data.data_dir
    for k, v in train_fields.items():
      config.train[k] = v
  return config


@pytest.mark.slow
def test_statistics_come_from_training_images_only(test_config, tmp_path):
  # fit_on='train': the recorded recipe refits on train + val once every choice is made.
  config = _baseline_config(test_config, epochs=1, steps_per_epoch=1, fit_on='train')
  data = config.data.copy_and_resolve_references()
  examples = ip.load_examples(data)
  split = ip.make_splits(examples.labels, config.split)[0]
  means = []
  for name, images in (('a', examples.images),
                       ('b', examples.images.copy())):
    if name == 'b':
      images[split.val] = 255 - images[split.val]  # every validation image changed
    ex = ip.Examples(images, examples.labels, examples.image_ids, examples.class_names)
    train.train_and_evaluate(config, str(tmp_path / name), examples=ex, split=split,
                             model_name='cellnet', augment=True, log=lambda s: None)
    model = models.get_model('cellnet', num_classes=4)
    programs = train.make_programs(model, train.make_optimizer(config.train), (24, 24, 3),
                                   options=train.StepOptions.from_config(config, augment=True))
    state = rundir.restore_run_state(str(tmp_path / name),
                                    jax.eval_shape(programs.init, train.seed_keys([0, 1])))
    means.append((np.asarray(state.input_mean), np.asarray(state.input_std)))
  want_mean, want_std = ip.channel_stats(examples.images[split.train])
  for mean, std in means:
    np.testing.assert_allclose(mean, np.tile(want_mean, (2, 1)), rtol=1e-6)
    np.testing.assert_allclose(std, np.tile(want_std, (2, 1)), rtol=1e-6)
  all_mean, _ = ip.channel_stats(examples.images)
  assert not np.allclose(want_mean, all_mean, atol=1e-4)


def _extract_smear(manual_dir, tmp_path, image_id):
  with zipfile.ZipFile(os.path.join(manual_dir, 'BCCD_Dataset-master.zip')) as z:
    base = f'BCCD_Dataset-master/BCCD/%s/BloodImage_{image_id:05d}.%s'
    jpg = z.read(base % ('JPEGImages', 'jpg'))
    xml = z.read(base % ('Annotations', 'xml'))
  (tmp_path / f'smear_{image_id}.jpg').write_bytes(jpg)
  (tmp_path / f'smear_{image_id}.xml').write_bytes(xml)
  return tmp_path / f'smear_{image_id}.jpg'


@pytest.fixture(scope='module')
def baseline_run(test_config, tmp_path_factory):
  """configs/baseline.py:test trained once for this module's end-to-end tests."""
  workdir = tmp_path_factory.mktemp('baseline') / 'run'
  cmd = [sys.executable, '-m', 'wbc_jax.main', '--config=configs/baseline.py:test',
         f'--workdir={workdir}', f'--config.data.manual_dir={test_config.data.manual_dir}',
         f'--config.data.data_dir={test_config.data.data_dir}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_baseline_config_end_to_end_and_predict_applies_the_stored_standardisation(
    test_config, baseline_run, tmp_path):
  workdir = baseline_run
  rdir = rundir.run_dir(str(workdir), 'crop', 'holdout', 'original+trad', 'cellnet')
  results = json.load(open(os.path.join(rdir, 'results.json')))
  assert results['select'] == 'last' and results['best_epoch'] == [2, 2]
  assert results['splits']['test']['ensemble']['n'] == 44
  preds = np.load(os.path.join(rdir, 'predictions.npz'))
  image_id = int(preds['test_image_ids'][0])
  smear = _extract_smear(test_config.data.manual_dir, tmp_path, image_id)
  from wbc_jax import predict
  got = predict.predict_files(rdir, [str(smear)])[0]
  class_names = results['class_names']
  np.testing.assert_allclose([got[f'p_{n}'] for n in class_names],
                             preds['test_probs'][:, 0].mean(0), atol=1e-4)
  # That equality means something only if the stored standardisation is not the identity.
  model = models.get_model('cellnet', num_classes=4)
  config = _baseline_config(test_config)
  programs = train.make_programs(model, train.make_optimizer(config.train), (24, 24, 3),
                                 options=train.StepOptions.from_config(config, augment=True))
  state = rundir.restore_run_state(rdir, jax.eval_shape(programs.init, train.seed_keys([0, 1])))
  assert np.all(np.abs(np.asarray(state.input_mean) - 0) > 0.2)
  assert np.all(np.abs(np.asarray(state.input_std) - 1) > 0.5)
  # The CLI writes the same row.
  out = tmp_path / 'p.csv'
  proc = subprocess.run([sys.executable, '-m', 'wbc_jax.predict', f'--workdir={rdir}',
                         f'--output={out}', str(smear)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = next(csv.DictReader(open(out)))
  assert row['predicted'] == got['predicted']

  # The located view: the same trained seeds on crops where the split's localiser found the
  # cell; the localiser saw the training boxes only.
  ldir = rundir.run_dir(str(workdir), 'located', 'holdout', 'original+trad', 'cellnet')
  located = json.load(open(os.path.join(ldir, 'results.json')))
  assert located['view'] == 'located' and located['located']['crop_run']
  assert located['splits']['train'] == results['splits']['train']
  assert located['located']['test_localisation']['frames'] == 44
  lpreds = np.load(os.path.join(ldir, 'predictions.npz'))
  np.testing.assert_array_equal(lpreds['test_image_ids'], preds['test_image_ids'])
  found = json.load(open(os.path.join(rundir.localiser_dir(str(workdir), 'holdout'),
                                      'detections.json')))
  assert found['test']['image_ids'] == preds['test_image_ids'].tolist()
  # A crop where the box was found elsewhere than annotated is another image: another answer.
  moved = [i for i, iou in enumerate(found['test_localisation']['iou']) if iou < 0.9]
  assert moved and not np.allclose(lpreds['test_probs'][:, moved], preds['test_probs'][:, moved])
  floor_located = rundir.run_dir(str(workdir), 'located', 'holdout', 'original+trad', 'floor')
  assert json.load(open(os.path.join(floor_located, 'results.json')))['view'] == 'located'
  # The report sets the located view beside the crop view, on the same test images.
  report = json.load(open(workdir / 'report' / 'report.json'))
  assert any(c['kind'] == 'view' and c['name_a'].endswith('located')
             for c in report['comparisons'])


_TWO_CELLS_XML = '''<annotation><object><name>WBC</name><bndbox><xmin>100</xmin><ymin>80</ymin>
<xmax>300</xmax><ymax>260</ymax></bndbox></object><object><name>RBC</name><bndbox><xmin>1</xmin>
<ymin>1</ymin><xmax>50</xmax><ymax>50</ymax></bndbox></object><object><name>WBC</name><bndbox>
<xmin>400</xmin><ymin>200</ymin><xmax>520</xmax><ymax>330</ymax></bndbox></object></annotation>'''


@pytest.mark.slow
def test_predict_raw_images_folders_two_cells_and_a_bad_file(test_config, baseline_run,
                                                              tmp_path):
  rdir = rundir.run_dir(str(baseline_run), 'crop', 'holdout', 'original+trad', 'cellnet')
  smear = _extract_smear(test_config.data.manual_dir, tmp_path, 1)
  folder = tmp_path / 'folder'
  folder.mkdir()
  (folder / 'a_raw.jpg').write_bytes(smear.read_bytes())        # no annotation beside it
  (folder / 'b_two.jpg').write_bytes(smear.read_bytes())
  (folder / 'b_two.xml').write_text(_TWO_CELLS_XML)              # two WBC boxes
  (folder / 'c_bad.jpg').write_bytes(b'not a jpeg')
  (folder / 'notes.txt').write_text('not an image')
  # The run's own localiser, with its threshold at 0 so that the 3-step fit finds something.
  own = rundir.localiser_dir(str(baseline_run), 'holdout')
  loc = tmp_path / 'localiser'
  loc.mkdir()
  for name in ('localiser.json', 'localiser.msgpack'):
    (loc / name).write_bytes(open(os.path.join(own, name), 'rb').read())
  meta = json.load(open(loc / 'localiser.json'))
  json.dump(dict(meta, threshold=0.0), open(loc / 'localiser.json', 'w'))
  out = tmp_path / 'rows.csv'
  proc = subprocess.run([sys.executable, '-m', 'wbc_jax.predict', f'--workdir={rdir}',
                         f'--localiser={loc}', f'--output={out}', '--batch_images=2',
                         str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]   # one image failed; the others have rows
  rows = list(csv.DictReader(open(out)))
  by_image = {}
  for row in rows:
    by_image.setdefault(os.path.basename(row['image']), []).append(row)
  assert sorted(by_image) == ['a_raw.jpg', 'b_two.jpg', 'c_bad.jpg']
  raw_rows = by_image['a_raw.jpg']
  assert raw_rows and all(r['box_source'] == 'localiser' and r['predicted'] and
                          float(r['box_score']) >= 0.0 for r in raw_rows)
  two = by_image['b_two.jpg']
  assert [r['box_source'] for r in two] == ['annotation', 'annotation']
  assert [(r['box_ymin'], r['box_xmin'], r['box_ymax'], r['box_xmax']) for r in two] == [
      ('80', '100', '260', '300'), ('200', '400', '330', '520')]   # the larger box first
  from wbc_jax import predict
  # Two crops, two sets of probabilities (the 4-step model's differ only in the last digits).
  p0, p1 = ([r[k] for k in r if k.startswith('p_')]
            for r in predict.predict_files(rdir, [str(folder / 'b_two.jpg')]))
  assert p0 != p1
  (bad,) = by_image['c_bad.jpg']
  assert 'not a readable image' in bad['error'] and not bad['predicted']
  assert 'c_bad.jpg' in proc.stderr and '1 image(s) failed' in proc.stderr
  # Nothing above the localiser's threshold: the best peak is classified, with a note, as the
  # located view does; with --min_score above it, the image's row is an error instead.
  json.dump(dict(meta, threshold=1.01), open(loc / 'localiser.json', 'w'))
  (row,) = predict.predict_files(rdir, [str(folder / 'a_raw.jpg')], localiser_dir=str(loc))
  assert row['predicted'] and 'below its threshold' in row['note'] and not row['error']
  (row,) = predict.predict_files(rdir, [str(folder / 'a_raw.jpg')], localiser_dir=str(loc),
                                 min_score=1.01)
  assert row['error'].startswith('no WBC found') and row['predicted'] == ''
  # The run's stored localiser is found from the run directory alone; the located run
  # directory stands for its crop run.
  ldir = rundir.run_dir(str(baseline_run), 'located', 'holdout', 'original+trad', 'cellnet')
  rows = predict.predict_files(ldir, [str(folder / 'b_two.jpg')])
  assert len(rows) == 2 and rows[0]['predicted']
  # A run without a localiser, on an image without annotation: a row with the error.
  lone = tmp_path / 'lone' / 'crop' / 'holdout' / 'original_trad'
  lone.mkdir(parents=True)
  import shutil
  shutil.copytree(rdir, lone / 'cellnet')
  (row,) = predict.predict_files(str(lone / 'cellnet'), [str(folder / 'a_raw.jpg')])
  assert 'has no localiser' in row['error']


# ----------------------------------------------------------------------------- removal table


def _fake_removal_run(root, ids_by_fold, labels_by_fold, correct, val_accuracy):
  """A work directory with repeat 0's folds: test predictions right where `correct` says."""
  for k, (ids, y) in enumerate(zip(ids_by_fold, labels_by_fold)):
    d = root / 'crop' / f'r0_k{k}' / 'original_trad' / 'cellnet'
    d.mkdir(parents=True)
    probs = np.full((1, len(y), 4), 0.1)
    right = correct(np.asarray(ids))
    probs[0, np.arange(len(y)), np.where(right, y, (y + 1) % 4)] = 0.7
    np.savez(d / 'predictions.npz', test_probs=probs, test_probs_no_tta=probs,
             test_probs_no_ema=probs, test_labels=y, test_image_ids=np.asarray(ids))
    per_seed = [{'accuracy': val_accuracy, 'balanced_accuracy': val_accuracy - 0.1}]
    json.dump({'class_names': ['EOSINOPHIL', 'LYMPHOCYTE', 'MONOCYTE', 'NEUTROPHIL'],
               'splits': {'val': {'per_seed': per_seed}}}, open(d / 'results.json', 'w'))


def test_removal_table_pools_repeat_zero_and_compares_with_the_full_recipe(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import removal_table
  ids = [np.arange(0, 20), np.arange(20, 40)]
  labels = [np.arange(20) % 4, np.arange(20) % 4]
  _fake_removal_run(tmp_path / 'full', ids, labels, lambda i: np.ones(len(i), bool), 0.9)
  # The arm misses every monocyte (label 2): 10 of 40 images.
  _fake_removal_run(tmp_path / 'arm', ids, labels, lambda i: i % 4 != 2, 0.8)
  _fake_removal_run(tmp_path / 'short', ids[:1], labels[:1], lambda i: np.ones(len(i), bool), 0.9)
  out = tmp_path / 'removal.md'
  removal_table.main([f'--full={tmp_path / "full"}', f'--arm=no monocytes={tmp_path / "arm"}',
                      f'--arm=cut short={tmp_path / "short"}', f'--out={out}', '--n_boot=50'])
  rows = {r['label']: r for r in json.load(open(tmp_path / 'removal.json'))}
  assert rows['full recipe']['accuracy']['point'] == 1.0
  arm = rows['no monocytes']
  assert arm['accuracy']['point'] == 0.75 and arm['recall']['MONOCYTE'] == 0.0
  assert arm['balanced_accuracy_minus_full']['point'] == pytest.approx(-0.25)
  assert arm['validation'] == pytest.approx({'accuracy': 0.8, 'balanced_accuracy': 0.7})
  assert rows['cut short']['incomplete'] == '1 of 2 folds'
  assert '| no monocytes | 75.0' in out.read_text()
