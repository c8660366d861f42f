"""Small helpers: atomic file writes, JSON lines, timing, what this process runs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
from typing import Any

import numpy as np

# The packages whose versions a report records (those installed).
VERSION_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow',
                    'tensorflow-cpu', 'tensorflow-datasets', 'numpy', 'scipy', 'scikit-learn',
                    'matplotlib')


def _default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f'not JSON serialisable: {type(o).__name__}')


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `path` so that a reader sees either the old file or the whole new one.

  Files that mark work as complete are written this way, and last, so a run killed
  mid-write never leaves a file that looks complete.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  mode = 'wb' if isinstance(data, bytes) else 'w'
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp.' + os.path.basename(path))
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  write_atomic(path, json.dumps(obj, indent=2, default=_default) + '\n')


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_jsonl(path: str, rows: list[dict]) -> None:
  write_atomic(path, ''.join(json.dumps(r, default=_default) + '\n' for r in rows))


def format_duration(seconds: float) -> str:
  """'1h02m03s', '2m03s' or '3s'; '?' for an unknown (non-finite) time."""
  if not np.isfinite(seconds):
    return '?'
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def software_versions() -> dict[str, str]:
  versions = {'python': platform.python_version()}
  for name in VERSION_PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def invocation() -> str:
  """The command line of this process, written as it would be typed."""
  argv = sys.argv
  if argv and argv[0].endswith(os.path.join('wbc_jax', 'main.py')):
    return shlex.join(['python', '-m', 'wbc_jax.main', *argv[1:]])
  return shlex.join(argv)


def tensorboard_writers(workdir: str, seeds) -> list:
  """One TensorBoard writer per seed (WORKDIR/tensorboard/seed_<s>); none without tensorboardX
  (optional: the curves are in metrics.jsonl and the figures anyway)."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return []
  return [SummaryWriter(os.path.join(workdir, 'tensorboard', f'seed_{s}')) for s in seeds]


def write_scalars(writers: list, row: dict) -> None:
  """Every per-seed list in one epoch's metrics row, to that seed's writer."""
  for i, w in enumerate(writers):
    for key, value in row.items():
      if isinstance(value, list):
        w.add_scalar(key, value[i], row['epoch'])
    w.flush()


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), for the machine line of recorded results."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
