"""Two CPU processes (jax.distributed over Gloo), started by scripts/launch_local.py, train
the tiny ablation together: the same metrics as one process, in both processes, and
after both are killed at the first checkpoint and restarted.

Each process has one CPU device and holds one of the two seeds (mesh seed = -1 = 2).
Tolerances against the one-process run: see tests/compare_runs.py; the killed and
restarted run equals the uninterrupted two-process run exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from compare_runs import assert_same_results, emulated_env, per_seed, run_dir
from wbc_jax import ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_RUN = ['--config.ablation.models=("cnn",)', '--config.ablation.regimes=("original",)',
           '--config.num_seeds=2']


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
  config = test_config.copy_and_resolve_references()
  with config.unlocked():
    config.num_seeds = 2
    config.ablation.models = ('cnn',)
    config.ablation.regimes = ('original',)
  workdir = str(tmp_path_factory.mktemp('one_process'))
  ablation.run(config, workdir, log=lambda s: None)
  return workdir


@pytest.fixture(scope='module')
def two_processes(test_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two_processes'))
  proc = subprocess.run(launch_cmd(test_config, workdir), cwd=ROOT, env=emulated_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
  return workdir, proc.stdout


def test_two_processes_match_one_process(reference, two_processes):
  workdir, stdout = two_processes
  assert '[p0] 2 processes (flags), 1 devices each here; 2 in all' in stdout
  finals = final_lines(stdout)
  assert set(finals) == {0, 1} and finals[0] == finals[1], stdout[-4000:]
  # Only process 0 logs and writes.
  assert not [l for l in stdout.splitlines() if l.startswith('[p1] [1/1]')]
  assert_same_results(run_dir(workdir), run_dir(reference))
  assert finals[0][0]['test_acc_mean'] == json.load(open(
      os.path.join(reference, 'summary.json')))[0]['test_acc_mean']


def test_kill_both_and_restart_resumes(test_config, two_processes, tmp_path):
  workdir, _ = two_processes
  killed = str(tmp_path / 'killed')
  cmd = launch_cmd(test_config, killed)
  # Its own session: the launcher and both processes are killed at once, as a node loss.
  proc = subprocess.Popen(cmd, cwd=ROOT, env=emulated_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  ckpt = os.path.join(run_dir(killed), 'checkpoints', '1')
  deadline = time.time() + 400
  while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed:\n' + proc.stdout.read()
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  assert not os.path.exists(os.path.join(run_dir(killed), 'results.json'))
  again = subprocess.run(cmd, cwd=ROOT, env=emulated_env(), capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
  assert '[p0]   resumed from epoch 1' in again.stdout
  finals = final_lines(again.stdout)
  assert set(finals) == {0, 1} and finals[0] == finals[1]
  # On CPU the resumed pair ends exactly where the uninterrupted pair ends.
  assert per_seed(run_dir(killed)) == per_seed(run_dir(workdir))
