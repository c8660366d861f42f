"""The benchmark script end to end, shrunk: one model, one seed, one repetition, no peer."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'benchmark.py')


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.mark.slow
def test_benchmark_writes_json_and_markdown(tmp_path):
  out = tmp_path / 'bench'
  cmd = [sys.executable, SCRIPT, '--models', 'cnn', '--seeds', '1', '--reps', '1',
         '--batch', '4', '--skip_keras', '--skip_gan', '--matmul_size', '512',
         '--out', str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'matmul peak' in proc.stdout

  result = json.loads((out / 'benchmark.json').read_text())
  assert (out / 'benchmark.md').is_file()
  markdown = (out / 'benchmark.md').read_text()
  assert '| cnn | 1 | 4 | 8,240,772 |' in markdown

  for key in ('date', 'command', 'args', 'machine', 'versions', 'settings', 'matmul_peak',
              'classifiers', 'seed_scaling', 'gan', 'keras_peer', 'process_maxrss_mb', 'wall_s'):
    assert key in result, key
  assert result['command'].startswith('python scripts/benchmark.py --models cnn')
  for key in ('cpu_model', 'usable_cores', 'jax_backend', 'jax_device_kind'):
    assert result['machine'][key], key
  assert result['settings']['tf_intra_op_threads'] == result['settings']['xla_intra_op_threads']
  assert _positive(result['matmul_peak']['gflop_per_s'])

  (row,) = result['classifiers']
  assert (row['model'], row['seeds'], row['batch']) == ('cnn', 1, 4)
  assert row['params_per_seed'] == 8_240_772
  assert result['complete'] is True
  assert 'skipped' not in row
  for key in ('compile_train_s', 'first_call_train_s', 'compile_predict_s',
              'first_call_predict_s', 'train_ms', 'train_images_per_s',
              'train_gflop_per_step', 'train_gflop_per_s', 'train_fraction_of_peak',
              'predict_ms', 'predict_images_per_s', 'predict_gflop_per_step',
              'predict_gflop_per_s', 'predict_fraction_of_peak', 'process_maxrss_mb'):
    assert _positive(row[key]), (key, row[key])
  assert row['train_images_per_s'] == pytest.approx(4 / (row['train_ms'] / 1e3))
  # The CNN's forward pass is ~0.48 GFLOP per 60x80 image; a train step is about 3x that.
  assert 0.4 < row['predict_gflop_per_step'] / 4 < 0.6
  assert 2.0 < row['train_gflop_per_step'] / row['predict_gflop_per_step'] < 4.0
  for key in ('argument', 'output', 'temp', 'total'):
    assert row['train_memory_bytes'][key] >= 0
  assert _positive(row['train_memory_bytes']['total'])

  assert result['gan'] == {'status': 'skipped', 'reason': '--skip_gan', 'rows': []}
  assert result['keras_peer']['status'] == 'skipped'
  assert result['keras_peer']['reason'] == '--skip_keras'
  assert result['keras_peer']['label'] == 'peer: Keras on TensorFlow, not part of wbc_jax'


def test_memory_shortfall_names_what_is_missing(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'scripts'))
  import benchmark_tools as bench

  def stats(temp):
    return {'flops': 1.0, 'memory_bytes': {'argument': 8, 'output': 8, 'alias': 8, 'temp': temp,
                                           'generated_code': 0, 'total': 8 + temp}}

  assert bench.memory_shortfall(stats(1024)) is None
  reason = bench.memory_shortfall(stats(2**60))
  assert reason.startswith('needs 1073741824.0 GiB more host memory')
