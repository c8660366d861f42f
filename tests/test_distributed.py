"""Two CPU processes (jax.distributed over Gloo), started by scripts/launch_local.py, train
the tiny ablation together; both are killed after the first checkpoint and restarted,
resume from it, and end with the metrics of a one-process run, the same in both.

Each process has one CPU device and holds one of the two seeds (mesh seed = -1 = 2).
Tolerances against the one-process run: see tests/compare_runs.py. (That a resumed run
equals an uninterrupted one exactly is tested on one process in tests/test_train.py;
one test here keeps this file within a few minutes on a 2-core machine.)
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import compare_runs
from compare_runs import assert_same_results, emulated_env, run_dir, train_one_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_RUN = [*compare_runs.ONE_RUN, '--config.num_seeds=2']


def launch_cmd(test_config, workdir):
  return [sys.executable, os.path.join('scripts', 'launch_local.py'), '--num_processes=2',
          '--', '--config=configs/ablation.py:test', f'--workdir={workdir}',
          f'--config.data.manual_dir={test_config.data.manual_dir}',
          f'--config.data.data_dir={test_config.data.data_dir}', *ONE_RUN]


def final_lines(stdout: str) -> dict[int, list]:
  """{process: its final rows} from the `[pI] process I of 2 final: [...]` lines."""
  out = {}
  for line in stdout.splitlines():
    for i in (0, 1):
      head = f'[p{i}] process {i} of 2 final: '
      if line.startswith(head):
        out[i] = json.loads(line[len(head):])
  return out


@pytest.fixture(scope='module')
def reference(test_config, tmp_path_factory):
  """The tiny ablation, 2 seeds, in this process (one device)."""
  return train_one_run(test_config, str(tmp_path_factory.mktemp('one_process')), num_seeds=2)


@pytest.mark.slow
def test_two_processes_killed_and_restarted_match_one_process(test_config, reference, tmp_path):
  """Both processes are killed after the first checkpoint; restarted, they resume from it
  and end with the one-process metrics, the same in both processes."""
  workdir = str(tmp_path / 'two_processes')
  cmd = launch_cmd(test_config, workdir)
  # Its own session: the launcher and both processes are killed at once, as a node loss.
  proc = subprocess.Popen(cmd, cwd=ROOT, env=emulated_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  ckpt = os.path.join(run_dir(workdir), 'checkpoints', '1')
  deadline = time.time() + 400
  while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed:\n' + proc.stdout.read()
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  first = proc.stdout.read()
  proc.stdout.close()
  assert '[p0] 2 processes (flags), 1 devices each here; 2 in all' in first, first[-4000:]
  assert not os.path.exists(os.path.join(run_dir(workdir), 'results.json'))

  again = subprocess.run(cmd, cwd=ROOT, env=emulated_env(), capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
  assert '[p0]   resumed from epoch 1' in again.stdout
  # Only process 0 logs (and writes); every process ends with the same metrics.
  assert not [l for l in again.stdout.splitlines() if l.startswith('[p1] [1/1]')]
  finals = final_lines(again.stdout)
  assert set(finals) == {0, 1} and finals[0] == finals[1], again.stdout[-4000:]
  assert_same_results(run_dir(workdir), run_dir(reference))
  summary = json.load(open(os.path.join(reference, 'summary.json')))[0]
  for key in ('test_acc_mean', 'test_acc_ens', 'test_bacc_mean', 'val_acc_best'):
    assert finals[1][0][key] == summary[key], key
