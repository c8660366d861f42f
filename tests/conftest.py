"""Shared fixtures: the real BCCD copy, prepared once per test session into a temp TFDS dir."""

import atexit
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # so tests can import configs/


def _share_compiled_programs() -> None:
  """A persistent JAX compilation cache for this session and every subprocess it starts.

  Many tests (and the command lines they run) compile the same small programs; from the
  second time on XLA's work is a disk read. Set before jax is imported, through the
  environment, so subprocesses inherit it. WBC_JAX_TEST_JAX_CACHE names a directory kept
  between sessions (a developer's loop); otherwise each session starts from an empty one, so
  CI never reuses programs compiled by another version of the code. The benchmark turns the
  cache off: it times compilation.
  """
  if 'jax' in sys.modules:
    return  # too late to configure through the environment
  cache = os.environ.get('WBC_JAX_TEST_JAX_CACHE')
  if not cache:
    cache = tempfile.mkdtemp(prefix='wbc_jax_xla_cache_')
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', cache)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')


_share_compiled_programs()


def bccd_manual_dir() -> str:
  path = os.environ.get('WBC_JAX_MANUAL_DIR') or os.path.join(ROOT, '..', 'shared', 'bccd')
  path = os.path.abspath(path)
  if not os.path.isfile(os.path.join(path, 'labels.csv')):
    pytest.fail(f'BCCD data not found at {path}: set WBC_JAX_MANUAL_DIR to a directory holding '
                'BCCD_Dataset-master.zip and labels.csv.')
  return path


@pytest.fixture(scope='session')
def manual_dir() -> str:
  return bccd_manual_dir()


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory, manual_dir) -> str:
  """A TFDS data_dir with bccd_wbc prepared from the manual directory."""
  import tensorflow_datasets as tfds
  import wbc_jax  # noqa: F401  registers bccd_wbc
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = tfds.builder('bccd_wbc', data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return data_dir


@pytest.fixture(scope='session')
def test_config(manual_dir, tfds_dir):
  from configs import ablation
  config = ablation.get_config('test')
  with config.unlocked():
    config.data.manual_dir = manual_dir
    config.data.data_dir = tfds_dir
  return config


@pytest.fixture
def evaluated_images(monkeypatch):
  """Every image array `evaluation.predict_probs` is given during the test (evaluation sees
  these)."""
  from wbc_jax import evaluation
  evaluated = []
  real_predict = evaluation.predict_probs

  def recording_predict(predict, params, batch_stats, images, batch_size, norm):
    evaluated.append(np.array(images))
    return real_predict(predict, params, batch_stats, images, batch_size, norm)

  monkeypatch.setattr(evaluation, 'predict_probs', recording_predict)
  return evaluated
