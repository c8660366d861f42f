"""End-to-end: the real entry point on the :test config, seeds vmapped, kill and restart."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import config_sections
from wbc_jax import ablation
from wbc_jax import input_pipeline as ip
from wbc_jax import rundir
from wbc_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLY_CNN = ['--config.ablation.models=("cnn",)', '--config.ablation.regimes=("original",)']


def _main_cmd(test_config, workdir, *extra):
  return [sys.executable, '-m', 'wbc_jax.main', '--config=configs/ablation.py:test',
          f'--workdir={workdir}', f'--config.data.manual_dir={test_config.data.manual_dir}',
          f'--config.data.data_dir={test_config.data.data_dir}', *extra]


def _run(cmd, **kw):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def _test_metrics(workdir, regime='original', model='cnn'):
  path = os.path.join(rundir.run_dir(workdir, 'frame', 'holdout', regime, model), 'results.json')
  with open(path) as f:
    return json.load(f)['splits']


@pytest.fixture(scope='module')
def full_run(test_config, tmp_path_factory):
  """One uninterrupted run of the entry point: both paper models, both regimes."""
  workdir = str(tmp_path_factory.mktemp('full'))
  proc = _run(_main_cmd(test_config, workdir))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir, proc.stdout


@pytest.mark.slow
def test_entry_point_end_to_end(full_run):
  workdir, stdout = full_run
  assert 'ablation done' in stdout and 'img/s' in stdout and 'ETA' in stdout
  for regime in ('original', 'original+trad'):
    for model in ('cnn', 'cnn_rnn'):
      rdir = rundir.run_dir(workdir, 'frame', 'holdout', regime, model)
      res = json.load(open(os.path.join(rdir, 'results.json')))
      test = res['splits']['test']
      assert test['ensemble']['n'] == 44  # every real test image counted once
      assert len(test['per_seed']) == 2
      assert sum(map(sum, test['ensemble']['confusion_matrix'])) == 44
      for name in ('metrics.jsonl', 'predictions.npz', 'learning_curves.png', 'confusion_test.png'):
        assert os.path.getsize(os.path.join(rdir, name)) > 0
      assert len(open(os.path.join(rdir, 'metrics.jsonl')).readlines()) == 2
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert len(summary) == 4
  assert '| frame |' in open(os.path.join(workdir, 'summary.md')).read()


@pytest.mark.slow
def test_completed_runs_are_skipped(full_run, test_config):
  workdir, _ = full_run
  before = _test_metrics(workdir)
  proc = _run(_main_cmd(test_config, workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count('complete, skipped') == 4
  assert _test_metrics(workdir) == before


@pytest.mark.slow
def test_kill_and_restart_matches_uninterrupted(full_run, test_config, tmp_path):
  workdir, _ = full_run
  killed = str(tmp_path / 'killed')
  cmd = _main_cmd(test_config, killed, *ONLY_CNN)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  ckpt = os.path.join(rundir.run_dir(killed, 'frame', 'holdout', 'original', 'cnn'),
                      'checkpoints', '1')
  deadline = time.time() + 300
  while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed'
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(ckpt)), 'results.json'))
  again = _run(cmd)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert 'resumed from epoch 1' in again.stdout
  # On CPU the resumed run is identical to the uninterrupted one.
  assert _test_metrics(killed) == _test_metrics(workdir)


def test_config_typo_fails_clearly(test_config, tmp_path):
  proc = _run(_main_cmd(test_config, str(tmp_path), '--config.modle=cnn'))
  assert proc.returncode != 0
  assert 'modle' in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'summary.json'))


@pytest.mark.parametrize('field,value,message', [
    ('models', ('cnn', 'vgg'), "unknown model 'vgg'"),
    ('regimes', ('original', 'gan'), "unknown regime 'gan'"),
    ('views', ('tile',), "unknown view 'tile'"),
])
def test_unknown_names_fail_clearly(test_config, tmp_path, field, value, message):
  config = test_config.copy_and_resolve_references()
  with config.unlocked():
    setattr(config.ablation, field, value)
  with pytest.raises(ValueError, match=message):
    ablation.run(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'summary.json'))


def test_vmapped_seeds_match_single_seed_runs(test_config, tmp_path):
  """Seed 1 trained beside seed 0 ends where seed 1 trained alone ends."""
  examples = ip.load_examples(test_config.data)
  split = ip.make_splits(examples.labels, test_config.split)[0]
  out = {}
  for name, (seed, num) in {'pair': (0, 2), 'alone': (1, 1)}.items():
    config = test_config.copy_and_resolve_references()
    with config.unlocked():
      config.seed, config.num_seeds = seed, num
      config.train.epochs = 1
    train.train_and_evaluate(config, str(tmp_path / name), examples=examples, split=split,
                             model_name='cnn', augment=True, log=lambda s: None)
    out[name] = np.load(tmp_path / name / 'predictions.npz')['test_probs']
  assert out['pair'].shape[0] == 2 and out['alone'].shape[0] == 1
  np.testing.assert_allclose(out['pair'][1], out['alone'][0], atol=2e-5)
  assert not np.allclose(out['pair'][0], out['pair'][1], atol=1e-3)  # seeds really differ


def _extract_smear(manual_dir, tmp_path, number=0):
  import zipfile
  name = f'BCCD_Dataset-master/BCCD/JPEGImages/BloodImage_{number:05d}.jpg'
  with zipfile.ZipFile(os.path.join(manual_dir, 'BCCD_Dataset-master.zip')) as z:
    path = tmp_path / f'smear_{number}.jpg'
    path.write_bytes(z.read(name))
    xml = z.read(name.replace('JPEGImages', 'Annotations').replace('.jpg', '.xml'))
  return path, xml


@pytest.mark.slow
def test_predict_cli_writes_csv(full_run, test_config, tmp_path):
  workdir, _ = full_run
  rdir = rundir.run_dir(workdir, 'frame', 'holdout', 'original', 'cnn')
  preds = np.load(os.path.join(rdir, 'predictions.npz'))
  # A test image of the run, whichever the split makes it: the CLI must reproduce the run's
  # own evaluation of that image (the mean of the seeds' probabilities).
  image_id = int(preds['test_image_ids'][0])
  want = preds['test_probs'][:, 0].mean(0)
  smear, _ = _extract_smear(test_config.data.manual_dir, tmp_path, image_id)
  out = tmp_path / 'preds.csv'
  proc = _run([sys.executable, '-m', 'wbc_jax.predict', f'--workdir={rdir}', f'--output={out}',
               str(smear)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  import csv
  from wbc_jax import predict
  class_names = rundir.restore_run(rdir).class_names
  assert class_names == ['EOSINOPHIL', 'LYMPHOCYTE', 'MONOCYTE', 'NEUTROPHIL']
  rows = list(csv.DictReader(open(out)))
  assert len(rows) == 1 and rows[0]['image'] == str(smear)
  # The CSV rounds to 4 decimals.
  np.testing.assert_allclose([float(rows[0][f'p_{n}']) for n in class_names], want, atol=1.5e-4)
  got = predict.predict_files(rdir, [str(smear)])[0]
  np.testing.assert_allclose([got[f'p_{n}'] for n in class_names], want, atol=1e-4)
  assert rows[0]['predicted'] == got['predicted'] == class_names[
      int(np.argmax([got[f'p_{n}'] for n in class_names]))]


def test_tested_parameters_are_those_of_the_first_best_validation_epoch(full_run):
  """results.json's selection, read against the run's own per-epoch validation accuracy:
  per seed the first epoch of highest accuracy, whose parameters are the ones evaluated."""
  workdir, _ = full_run
  for regime in ('original', 'original+trad'):
    for model in ('cnn', 'cnn_rnn'):
      rdir = rundir.run_dir(workdir, 'frame', 'holdout', regime, model)
      results = json.load(open(os.path.join(rdir, 'results.json')))
      history = [json.loads(line) for line in open(os.path.join(rdir, 'metrics.jsonl'))]
      val = np.array([row['val_acc'] for row in history])  # [epochs, seeds]
      assert results['select'] == 'val_accuracy'
      # np.argmax returns the first of equal maxima.
      np.testing.assert_array_equal(results['best_epoch'], np.argmax(val, axis=0) + 1)
      np.testing.assert_allclose(results['best_val_accuracy'], val.max(axis=0))
      final_val = [m['accuracy'] for m in results['splits']['val']['per_seed']]
      np.testing.assert_allclose(final_val, val.max(axis=0), atol=1e-6)


def test_predict_reads_the_annotated_boxes_or_the_box_flag(test_config, tmp_path):
  from wbc_jax import predict
  smear, xml = _extract_smear(test_config.data.manual_dir, tmp_path)
  assert predict.annotated_boxes(str(smear), (480, 640)) is None   # no VOC file beside it
  (tmp_path / 'smear_0.xml').write_bytes(xml)
  boxes = predict.annotated_boxes(str(smear), (480, 640))
  assert boxes.shape == (1, 4) and np.all((boxes >= 0) & (boxes <= 1))
  np.testing.assert_allclose(predict.parse_box_flag('48,64,96,128', (480, 640)),
                             [[0.1, 0.1, 0.2, 0.2]])
  (tmp_path / 'smear_0.xml').write_text('<annotation><object><name>RBC</name></object>'
                                        '</annotation>')
  with pytest.raises(predict.PredictError, match='no WBC box in the annotation'):
    predict.annotated_boxes(str(smear), (480, 640))


def test_predict_missing_run_dir_is_clear(tmp_path):
  proc = _run([sys.executable, '-m', 'wbc_jax.predict', f'--workdir={tmp_path}', 'x.jpg'])
  assert proc.returncode == 2 and 'no config.json' in proc.stderr


@pytest.mark.slow
def test_gan_regime_keeps_synthetic_images_out_of_evaluation(test_config, tmp_path,
                                                            evaluated_images):
  """The '+gan' regime trains on synthetic images; no evaluation ever sees one."""
  config = test_config.copy_and_resolve_references()
  with config.unlocked():
    config.ablation.models = ('cnn',)
    config.ablation.regimes = ('original+gan',)
    config.train.epochs = 1
  workdir = str(tmp_path)
  rows = ablation.run(config, workdir, log=lambda s: None)
  gan_dir = os.path.join(workdir, 'frame', 'holdout', f'gan_{config.gan.kind}')
  synthetic = np.load(os.path.join(gan_dir, 'synthetic.npz'))
  examples = ip.load_examples(test_config.data)
  split = ip.make_splits(examples.labels, config.split)[0]
  counts = np.bincount(examples.labels[split.train], minlength=4)
  expected = np.maximum(config.synthetic.target_per_class - counts, 0)
  np.testing.assert_array_equal(np.bincount(synthetic['labels'], minlength=4), expected)
  assert rows[0]['n_synthetic'] == expected.sum() > 0
  fake = {img.tobytes() for img in synthetic['images']}
  real = {img.tobytes() for img in examples.images}
  assert not fake & real
  seen = [img.tobytes() for batch in evaluated_images for img in batch]
  assert seen and not set(seen) & fake
  assert set(seen) <= real
  preds = np.load(os.path.join(rundir.run_dir(workdir, 'frame', 'holdout', 'original+gan', 'cnn'),
                               'predictions.npz'))
  np.testing.assert_array_equal(preds['test_image_ids'], examples.image_ids[split.test])
  np.testing.assert_array_equal(preds['val_image_ids'], examples.image_ids[split.val])


def test_epoch_steps_basis_all_counts_synthetic_images_and_real_does_not():
  tc = config_sections.section('train', batch_size=32, max_steps_per_epoch=-1,
                               steps_per_epoch_basis='all')
  assert ip.epoch_steps(tc, num_real=165, num_extra=1035) == 38  # ceil(1200 / 32)
  tc.steps_per_epoch_basis = 'real'
  assert ip.epoch_steps(tc, num_real=165, num_extra=1035) == 6   # ceil(165 / 32)
  assert ip.epoch_steps(tc, num_real=165, num_extra=0) == 6
  tc.max_steps_per_epoch = 4
  assert ip.epoch_steps(tc, num_real=165, num_extra=1035) == 4
  tc.steps_per_epoch_basis = 'synthetic'
  with pytest.raises(ValueError, match='steps_per_epoch_basis'):
    ip.epoch_steps(tc, num_real=165, num_extra=0)


def test_gan_regimes_refuse_several_processes(test_config, monkeypatch):
  from wbc_jax import sharding
  config = test_config.copy_and_resolve_references()
  with config.unlocked():
    config.ablation.regimes = ('original', 'original+gan')
  monkeypatch.setattr(sharding, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match='original\\+gan: GAN training runs in one process only'):
    ablation.validate(config)
  monkeypatch.setattr(sharding, 'process_count', lambda: 1)
  ablation.validate(config)
