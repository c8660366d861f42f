"""The report: every number in REPORT.md against report.json and against a recomputation
from the files it was built from (results.json, predictions.npz).

Most tests build small work directories by hand (no training: results.json and
predictions.npz written from random probabilities), so that pooling, repeats, comparisons,
the leaky section and the GAN section are exercised with non-trivial numbers in seconds. One
module-scoped fixture runs the real entry point once on the :test config.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from fake_workdirs import make_kfold_workdir, make_workdir
from wbc_jax import cells
from wbc_jax import names
from wbc_jax import report
from wbc_jax import stats
from wbc_jax import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(n_boot=200, log=lambda s: None)


def _runs_of(workdir, cell):
  """(split, results, predictions) of a cell's runs, read back from disk."""
  out = []
  for split in cell['splits']:
    rdir = os.path.join(workdir, cell['view'], split, cell['regime'].replace('+', '_'),
                        cell['model'])
    with np.load(os.path.join(rdir, 'predictions.npz')) as z:
      out.append((split, utils.read_json(os.path.join(rdir, 'results.json')), dict(z)))
  return out


def _recompute_pooled(workdir, cell, score):
  """Mean over repeats of score(labels, preds) on each repeat's pool, with sklearn."""
  by_repeat = {}
  for split, _, z in _runs_of(workdir, cell):
    by_repeat.setdefault(cells.repeat_of(split), []).append(z)
  values = []
  for parts in by_repeat.values():
    labels = np.concatenate([z['test_labels'] for z in parts])
    preds = np.concatenate([z['test_probs'].mean(0).argmax(-1) for z in parts])
    values.append(score(labels, preds))
  return float(np.mean(values))


def _row(markdown, *cells):
  """The one table row of REPORT.md starting with these cells."""
  start = '| ' + ' | '.join(cells) + ' |'
  rows = [line for line in markdown.splitlines() if line.startswith(start)]
  assert len(rows) == 1, (start, rows)
  return rows[0]


@pytest.fixture(scope='module')
def kfold_report(tmp_path_factory):
  """2 repeats x 3 folds, 2 regimes x 2 models, plus one LEAKY run and two GAN dirs."""
  workdir = make_kfold_workdir(tmp_path_factory.mktemp('kfold'))
  data = report.write_report(workdir, **QUIET)
  with open(os.path.join(workdir, 'REPORT.md')) as f:
    markdown = f.read()
  return workdir, data, markdown


def _honest(data):
  return [c for c in data['cells'] if not c['leaky']]


# ----------------------------------------------------------------------------- pure functions


def test_repeat_of():
  assert cells.repeat_of('r0_k3') == 0
  assert cells.repeat_of('r2_k0') == 2
  assert cells.repeat_of('holdout') == 0


# ----------------------------------------------------------------------------- built reports


def test_pooled_oof_matches_sklearn_recomputation(kfold_report):
  workdir, data, _ = kfold_report
  scores = {'accuracy': skm.accuracy_score, 'balanced_accuracy': skm.balanced_accuracy_score,
            'macro_f1': lambda y, p: skm.f1_score(y, p, average='macro', zero_division=0)}
  for cell in _honest(data):
    assert cell['repeats'] == 2 and cell['pooled_n'] == 60 and len(cell['splits']) == 6
    for name, score in scores.items():
      pooled = cell['pooled'][name]
      assert pooled['point'] == pytest.approx(_recompute_pooled(workdir, cell, score))
      assert pooled['low'] <= pooled['point'] <= pooled['high']


def test_mean_sd_over_splits_and_seeds(kfold_report):
  workdir, data, _ = kfold_report
  for cell in _honest(data):
    values = [m['balanced_accuracy'] for _, res, _ in _runs_of(workdir, cell)
              for m in res['splits']['test']['per_seed']]
    assert len(values) == 6 * 2
    got = cell['mean_sd']['balanced_accuracy']
    assert got['mean'] == pytest.approx(np.mean(values))
    assert got['sd'] == pytest.approx(np.std(values, ddof=1))


def test_markdown_rows_print_report_json(kfold_report):
  _, data, markdown = kfold_report
  for cell in _honest(data):
    row = _row(markdown, 'frame', names.REGIME_LABELS[cell['regime']],
               names.MODEL_LABELS[cell['model']])
    for key in ('accuracy', 'balanced_accuracy', 'macro_f1'):
      assert f'| {report._mean_sd_text(cell["mean_sd"][key])} |' in row
      assert f'| {report._ci_text(cell["pooled"][key])} |' in row
    majority = cell['majority']['pooled']
    assert row.endswith(f'| {report.pct(majority["accuracy"])} | '
                        f'{report.pct(majority["balanced_accuracy"])} |')


def test_majority_baseline_is_the_training_majority(kfold_report):
  _, data, markdown = kfold_report
  for cell in _honest(data):
    assert cell['majority']['classes'] == ['NEUTROPHIL']
    assert cell['majority']['pooled']['accuracy'] == pytest.approx(24 / 60)
    assert cell['majority']['pooled']['balanced_accuracy'] == pytest.approx(0.25)
  assert '| majority acc | majority bal. acc |' in markdown
  assert 'most frequent training class (NEUTROPHIL)' in markdown


def test_comparisons_recomputed(kfold_report):
  workdir, data, markdown = kfold_report
  comps = data['comparisons']
  # GAN vs original for each model, CNN-RNN vs CNN for each regime; the LEAKY run never.
  assert sorted((c['name_a'], c['name_b']) for c in comps) == sorted([
      ('GAN (CNN)', 'original (CNN)'), ('GAN (CNN-RNN)', 'original (CNN-RNN)'),
      ('original (CNN-RNN)', 'original (CNN)'), ('GAN (CNN-RNN)', 'GAN (CNN)')])
  cells = {(c['regime'], c['model']): c for c in _honest(data)}
  raw_p = []
  for c in comps:
    a, b = cells[(c['a']['regime'], c['a']['model'])], cells[(c['b']['regime'], c['b']['model'])]
    ra, rb = _runs_of(workdir, a), _runs_of(workdir, b)
    expected = stats.corrected_resampled_ttest(
        [res['splits']['test']['ensemble']['balanced_accuracy'] for _, res, _ in ra],
        [res['splits']['test']['ensemble']['balanced_accuracy'] for _, res, _ in rb],
        n_train=round(a['n_train']), n_test=round(a['n_test']))
    assert c['ttest'] == pytest.approx(expected)
    raw_p.append(c['ttest']['p'])
    # McNemar on the first repeat's pool, aligned by image id.
    pools = []
    for runs in (ra, rb):
      zs = [z for split, _, z in runs if split.startswith('r0_')]
      ids = np.concatenate([z['test_image_ids'] for z in zs])
      preds = np.concatenate([z['test_probs'].mean(0).argmax(-1) for z in zs])
      labels = np.concatenate([z['test_labels'] for z in zs])
      order = np.argsort(ids)
      pools.append((labels[order], preds[order]))
    assert c['mcnemar'] == stats.mcnemar_exact(pools[0][0], pools[0][1], pools[1][1])
    assert c['sentence'] in markdown
  assert [c['ttest_p_holm'] for c in comps] == pytest.approx(stats.holm(raw_p))


def test_leaky_run_is_kept_apart(kfold_report):
  _, data, markdown = kfold_report
  assert len(data['cells']) == 4 + 1  # no cell from gan_cond/cas/
  (leaky,) = [c for c in data['cells'] if c['leaky']]
  assert leaky['protocol'] == 'paper'
  honest_part, _, leaky_part = markdown.partition('\n## LEAKY')
  assert '| frame | GAN | CNN | 1 x 2 |' not in honest_part
  row = _row(leaky_part, 'LEAKY', 'frame', 'GAN', 'CNN')
  assert row.endswith('| 75.0 | 40.0 | 30.0 |')
  assert all(c['protocol'] != 'paper' for c in data['comparisons'])


def test_paper_table_and_gan_section(kfold_report):
  workdir, _, markdown = kfold_report
  assert 'measured on a test split drawn after synthetic images were mixed in' in markdown
  row = _row(markdown, 'GAN', 'CNN-RNN')
  assert '| 87.8 | 180 |' in row
  assert '"Test accuracy: 0.8777777552604675"' in markdown
  assert '![samples](frame/r0_k0/gan_cond/samples/step_000002.png)' in markdown
  assert '| kid.overall.mean | 0.01235 |' in markdown and 'per_class' not in markdown
  assert '- KID is unbiased.' in markdown
  assert os.path.exists(os.path.join(workdir, 'report', 'pooled_balanced_accuracy.png'))


def test_holdout_says_ttest_not_defined(tmp_path):
  workdir = make_workdir(tmp_path, protocol='holdout', models=('cnn',))
  data = report.write_report(workdir, **QUIET)
  (c,) = data['comparisons']
  assert c['ttest'] is None and 'not defined' in c['ttest_note']
  with open(os.path.join(workdir, 'REPORT.md')) as f:
    markdown = f.read()
  assert 'not defined (one split)' in markdown
  assert 'exact McNemar p' in c['sentence'] and c['sentence'] in markdown
  (cell,) = [x for x in data['cells'] if x['regime'] == 'original']
  assert cell['pooled']['balanced_accuracy']['point'] == pytest.approx(
      _recompute_pooled(workdir, cell, skm.balanced_accuracy_score))


def test_bad_workdir_fails_with_the_path(tmp_path):
  with pytest.raises(report.ReportError, match='no such work directory'):
    report.write_report(str(tmp_path / 'missing'), **QUIET)
  with pytest.raises(report.ReportError, match='no completed runs'):
    report.write_report(str(tmp_path), **QUIET)
  assert not os.path.exists(tmp_path / 'REPORT.md')
  proc = subprocess.run([sys.executable, '-m', 'wbc_jax.report', f'--workdir={tmp_path}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert str(tmp_path) in proc.stderr and 'no completed runs' in proc.stderr


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def trained(tmp_path_factory, manual_dir, tfds_dir):
  """The real entry point, once: kfold with 2 folds, one model, one regime, one epoch."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  cmd = [sys.executable, '-m', 'wbc_jax.main', '--config=configs/ablation.py:test',
         f'--workdir={workdir}', f'--config.data.manual_dir={manual_dir}',
         f'--config.data.data_dir={tfds_dir}', '--config.split.protocol=kfold',
         '--config.split.folds=2', '--config.train.epochs=1',
         '--config.ablation.models=("cnn",)', '--config.ablation.regimes=("original",)']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_ablation_writes_the_report(trained):
  with open(os.path.join(trained, 'REPORT.md')) as f:
    markdown = f.read()
  with open(os.path.join(trained, 'report', 'report.json')) as f:
    data = json.load(f)
  (cell,) = data['cells']
  assert cell['splits'] == ['r0_k0', 'r0_k1'] and cell['pooled_n'] == 293
  expected = _recompute_pooled(trained, cell, skm.balanced_accuracy_score)
  pooled = cell['pooled']['balanced_accuracy']
  assert pooled['point'] == pytest.approx(expected)
  row = _row(markdown, 'frame', 'original', 'CNN')
  assert f'| {report._ci_text(pooled)} |' in row
  # The majority baseline: neutrophil, 174 of the 293 images.
  assert row.endswith(f'| {report.pct(174 / 293)} | 25.0 |')
  assert 'wbc_jax.main' in data['header']['command']
  for path in (cell['figures']['confusion'], *cell['learning_curves'].values()):
    assert os.path.getsize(os.path.join(trained, path)) > 0
