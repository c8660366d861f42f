r"""Runs wbc_jax.main as N cooperating CPU processes on this machine (jax.distributed over Gloo).

  python scripts/launch_local.py --num_processes=2 -- \
      --config=configs/ablation.py:test --workdir=/tmp/wbc_two

Everything after `--` goes to `python -m wbc_jax.main`, to which each process adds
--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I. Each line a
process prints is shown prefixed with `[pI]`. Waits for all; if one fails, stops the
others (they would wait for it in their next collective) and exits with its status.

For testing the multi-process code paths on one machine, not for speed: the processes
share its cores. --devices_per_process emulates several CPU devices in each process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--num_processes', '-n', type=int, default=2)
  p.add_argument('--port', type=int, default=0, help='coordinator port (0: a free one)')
  p.add_argument('--devices_per_process', type=int, default=0,
                 help='emulated CPU devices per process (0: leave XLA_FLAGS as it is)')
  p.add_argument('main_args', nargs=argparse.REMAINDER,
                 help='-- then the arguments of wbc_jax.main')
  args = p.parse_args(argv)
  if args.main_args[:1] == ['--']:
    args.main_args = args.main_args[1:]
  if args.num_processes < 1:
    p.error('--num_processes must be >= 1')
  return args


def child_env(devices_per_process: int) -> dict[str, str]:
  env = dict(os.environ)
  # CPU processes: keep them off any accelerator this machine may have.
  env.setdefault('JAX_PLATFORMS', 'cpu')
  if devices_per_process > 0:
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(
        flags + [f'--xla_force_host_platform_device_count={devices_per_process}'])
  return env


def _forward(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
  for line in proc.stdout:
    with lock:
      sys.stdout.write(f'{prefix} {line}')
      sys.stdout.flush()


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  port = args.port or free_port()
  env = child_env(args.devices_per_process)
  procs, threads, lock = [], [], threading.Lock()
  for i in range(args.num_processes):
    cmd = [sys.executable, '-u', '-m', 'wbc_jax.main', *args.main_args,
           f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={args.num_processes}',
           f'--process_id={i}']
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    procs.append(proc)
    t = threading.Thread(target=_forward, args=(proc, f'[p{i}]', lock), daemon=True)
    t.start()
    threads.append(t)

  def stop_all(signum=None, frame=None):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM if signum is None else signum)

  signal.signal(signal.SIGTERM, stop_all)
  signal.signal(signal.SIGINT, stop_all)
  status = 0
  while any(p.poll() is None for p in procs):
    failed = [p for p in procs if p.poll() not in (None, 0)]
    if failed and not status:
      status = failed[0].returncode
      with lock:
        print(f'[launch] process {procs.index(failed[0])} exited with {status}; stopping the '
              'others', flush=True)
      stop_all()
    time.sleep(0.2)
  for t in threads:
    t.join()
  codes = [p.returncode for p in procs]
  status = status or next((c for c in codes if c != 0), 0)
  if status:
    print(f'[launch] exit codes {codes}', flush=True)
  # A signal's negative return code is not a valid exit status.
  return status if status > 0 else (128 - status if status < 0 else 0)


if __name__ == '__main__':
  sys.exit(main())
