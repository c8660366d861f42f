"""The work directory of an ablation: where each run and GAN lives, finding the finished ones,
and restoring a finished run.

  WORKDIR/config.json                           the ablation's config
  WORKDIR/<view>/splits.json                    the image_ids of every split (for audits)
  WORKDIR/<view>/<split>/<regime>/<model>/      one run ('+' in the regime's name becomes
      '_'): config.json, checkpoints/, metrics.jsonl, tensorboard/, predictions.npz,
      learning_curves.png, confusion_test.png and results.json (written atomically, last:
      its presence marks the run finished)
  WORKDIR/<view>/<split>/gan_<kind>/            a split's GAN: checkpoints, samples/,
      synthetic.npz, and with the synthetic-data measures measures.json, its figures and
      cas/ (the Classification Accuracy Score's run)
  WORKDIR/<view>/<split>/measures/feature_cnn/  the measures' feature CNN, where the split
      has no finished original/cnn run
  WORKDIR/<view>/paper/gan_<kind>/              the paper protocol's GAN (every image)
  WORKDIR/located/<split>/localiser/            a split's WBC localiser (`wbc_jax.located`),
      fitted on its training boxes: localiser.msgpack, localiser.json, detections.json
  WORKDIR/summary.json, summary.md, REPORT.md, report/

Everything that writes or reads these paths goes through this module: the driver
(`wbc_jax.ablation`), the measures (`wbc_jax.measures`), the report and prediction.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from wbc_jax import evaluation
from wbc_jax import input_pipeline as ip
from wbc_jax import models
from wbc_jax import names
from wbc_jax import train
from wbc_jax import utils

CONFIG = 'config.json'
SPLITS = 'splits.json'
RESULTS = 'results.json'
PREDICTIONS = 'predictions.npz'
SYNTHETIC = 'synthetic.npz'
MEASURES = 'measures.json'
GAN_PREFIX = 'gan_'
# Directories beside the regimes of a split that hold classifier runs which are not cells of
# the ablation: the measures' feature CNN here, and a GAN's CAS run (under GAN_PREFIX).
_NOT_REGIMES = ('measures', 'localiser')
LOCATED_VIEW = 'located'


class RunDirError(ValueError):
  """A directory is not the finished run it should be; the message names the path."""


# ----------------------------------------------------------------------------- paths


def regime_dir_name(regime: str) -> str:
  return regime.replace('+', '_')


def regime_of_dir_name(dir_name: str) -> str:
  """The regime whose directory is `dir_name`; the inverse of `regime_dir_name`."""
  known = {regime_dir_name(r): r for r in names.REGIME_NAMES}
  return known.get(dir_name, dir_name.replace('_', '+'))


def splits_path(workdir: str, view: str) -> str:
  return os.path.join(workdir, view, SPLITS)


def split_dir(workdir: str, view: str, split: str) -> str:
  return os.path.join(workdir, view, split)


def run_dir(workdir: str, view: str, split: str, regime: str, model: str) -> str:
  return os.path.join(split_dir(workdir, view, split), regime_dir_name(regime), model)


def gan_dir(workdir: str, view: str, split: str, kind: str) -> str:
  return os.path.join(split_dir(workdir, view, split), GAN_PREFIX + kind)


def feature_cnn_dir(workdir: str, view: str, split: str) -> str:
  return os.path.join(split_dir(workdir, view, split), 'measures', 'feature_cnn')


def localiser_dir(workdir: str, split: str) -> str:
  return os.path.join(split_dir(workdir, LOCATED_VIEW, split), 'localiser')


def localiser_dir_of_run(run_dir_: str) -> str:
  """The localiser of the split a run directory WORKDIR/<view>/<split>/<regime>/<model>
  belongs to (it may not exist)."""
  split_path = os.path.dirname(os.path.dirname(os.path.abspath(run_dir_)))
  workdir = os.path.dirname(os.path.dirname(split_path))
  return localiser_dir(workdir, os.path.basename(split_path))


def is_finished(run_dir_: str) -> bool:
  return os.path.exists(os.path.join(run_dir_, RESULTS))


def read_config(workdir: str) -> dict:
  """WORKDIR/config.json as a dict; {} when there is none."""
  path = os.path.join(workdir, CONFIG)
  return utils.read_json(path) if os.path.exists(path) else {}


def run_config(config: ml_collections.ConfigDict, view: str, regime: str,
               model: str) -> ml_collections.ConfigDict:
  """The config of one run (its config.json): the ablation's, with the run's view, model
  and regime set."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.data.view = view
    out.model = model
    out.regime = regime
  return out


# ----------------------------------------------------------------------------- finding


@dataclasses.dataclass
class Run:
  """One finished run directory WORKDIR/<view>/<split>/<regime>/<model>/."""
  view: str
  split: str
  regime: str
  model: str
  protocol: str
  path: str         # relative to the work directory
  results: dict

  @property
  def leaky(self) -> bool:
    return self.protocol == 'paper' or self.split.startswith('paper')

  def predictions(self, workdir: str) -> dict[str, np.ndarray]:
    path = os.path.join(workdir, self.path, PREDICTIONS)
    if not os.path.exists(path):
      raise RunDirError(f'{path}: missing; the pooled out-of-fold metrics need every run\'s '
                        'test predictions.')
    with np.load(path) as z:
      missing = {'test_probs', 'test_labels', 'test_image_ids'} - set(z.files)
      if missing:
        raise RunDirError(f'{path}: lacks {", ".join(sorted(missing))}.')
      return {k: z[k] for k in z.files}


def _run_protocol(run_dir_: str, results: dict, workdir_config: dict) -> str:
  """The split protocol of a run: results.json, else the run's config.json, else the workdir's."""
  if 'protocol' in results:
    return str(results['protocol'])
  config_path = os.path.join(run_dir_, CONFIG)
  config = utils.read_json(config_path) if os.path.exists(config_path) else workdir_config
  return str(config.get('split', {}).get('protocol', 'unknown'))


def find_runs(workdir: str) -> list[Run]:
  """Every finished run (one with results.json) of the work directory, sorted by path."""
  workdir_config = read_config(workdir)
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, '*', '*', '*', '*', RESULTS))):
    rdir = os.path.dirname(path)
    view, split, regime_dir, model = os.path.relpath(rdir, workdir).split(os.sep)
    if regime_dir.startswith(GAN_PREFIX) or regime_dir in _NOT_REGIMES:
      continue
    results = utils.read_json(path)
    # results.json names its view and regime since they were added; older ones by the path.
    runs.append(Run(view=results.get('view', view), split=results.get('split', split),
                    regime=results.get('regime', regime_of_dir_name(regime_dir)),
                    model=results.get('model', model),
                    protocol=_run_protocol(rdir, results, workdir_config),
                    path=os.path.relpath(rdir, workdir), results=results))
  return runs


@dataclasses.dataclass(frozen=True)
class GanDir:
  """One GAN directory WORKDIR/<view>/<split>/gan_<kind>/."""
  view: str
  split: str
  kind: str
  path: str         # absolute or relative as the work directory was given


def find_gan_dirs(workdir: str, *, with_synthetic: bool = False) -> list[GanDir]:
  """The GAN directories of the work directory, sorted by path; with_synthetic: only those
  holding their samples (synthetic.npz)."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, '*', '*', GAN_PREFIX + '*'))):
    if not os.path.isdir(path) or (with_synthetic and
                                   not os.path.exists(os.path.join(path, SYNTHETIC))):
      continue
    view, split, name = os.path.relpath(path, workdir).split(os.sep)
    found.append(GanDir(view=view, split=split, kind=name[len(GAN_PREFIX):], path=path))
  return found


# ----------------------------------------------------------------------------- restoring


@dataclasses.dataclass
class FinishedRun:
  """A finished run, restored: its config and results, model, programs and trained state.

  state: the TrainState of every seed ([S, ...] leaves) at the last checkpoint, whose
  best_params / best_batch_stats are each seed's selected parameters.
  """
  path: str
  config: ml_collections.ConfigDict
  results: dict
  model: Any
  image_shape: tuple[int, int, int]
  programs: train.Programs
  state: train.TrainState

  @property
  def class_names(self) -> list[str]:
    return list(self.results['class_names'])

  def predict(self, images_uint8: np.ndarray) -> np.ndarray:
    """The seed ensemble's probabilities [N, C] of uint8 images [N, H, W, 3]."""
    return self.predict_seeds(images_uint8).mean(axis=0)

  def predict_seeds(self, images_uint8: np.ndarray) -> np.ndarray:
    """Every seed's probabilities [S, N, C] of uint8 images [N, H, W, 3]."""
    # The standardisation and prior correction stored in the state (training images').
    return evaluation.predict_probs(self.programs.predict, self.state.best_params,
                                    self.state.best_batch_stats, images_uint8,
                                    self.config.train.eval_batch_size, self.state.predict_consts)

  def seed_variables(self, index: int = 0) -> dict:
    """The flax variables of seed `index`'s selected parameters, on the host."""
    take = lambda tree: jax.tree.map(lambda a: np.asarray(a[index]), tree)
    variables = {'params': take(self.state.best_params)}
    if self.state.best_batch_stats:
      variables['batch_stats'] = take(self.state.best_batch_stats)
    return variables


def restore_run_state(rdir: str, abstract_state) -> Any:
  """The TrainState [S, ...] of a run directory's latest checkpoint.

  abstract_state: the state's shapes (e.g. `jax.eval_shape` of the vmapped init), with or
  without shardings. Raises FileNotFoundError naming the directory when there is no checkpoint.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  with ocp.CheckpointManager(os.path.abspath(os.path.join(rdir, 'checkpoints'))) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{rdir}/checkpoints: no checkpoint to load.')
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']


def restore_run(rdir: str) -> FinishedRun:
  """Rebuilds a finished run from its config.json, results.json and checkpoints/.

  The model, image shape, step options (a moving average or not) and test-time augmentation
  are the ones the run was trained with. Raises RunDirError naming the directory when it is
  not a finished run.
  """
  for name in (CONFIG, RESULTS):
    if not os.path.isfile(os.path.join(rdir, name)):
      raise RunDirError(f'{rdir}: no {name}; expected a completed run directory of the '
                        'ablation (WORKDIR/<view>/<split>/<regime>/<model>).')
  config = ml_collections.ConfigDict(utils.read_json(os.path.join(rdir, CONFIG)))
  results = utils.read_json(os.path.join(rdir, RESULTS))
  model = models.get_model(results['model'], num_classes=len(results['class_names']),
                           conv_impl=config.train.conv_impl)
  shape = (*ip.image_size(config.data), 3)
  programs = train.make_programs(
      model, train.make_optimizer(config.train), shape,
      options=train.StepOptions.from_config(config, augment=False), tta=config.train.tta)
  try:
    state = restore_run_state(
        rdir, jax.eval_shape(programs.init, train.seed_keys(results['seeds'])))
  except FileNotFoundError as e:
    raise RunDirError(str(e)) from e
  return FinishedRun(path=rdir, config=config, results=results, model=model, image_shape=shape,
                     programs=programs, state=state)
