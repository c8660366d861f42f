"""The ablation driver: views x splits x regimes x models, each a run of S seeds.

The work directory's layout (one directory per run, per split's GAN, the summary and the
report) is `wbc_jax.rundir`'s; the regimes and models are `wbc_jax.names`'s. After the runs,
with config.synthetic.measures, each split's synthetic images are measured
(`wbc_jax.measures`); then WORKDIR/summary.json and summary.md (one row per run) are rebuilt
and the report is written (`wbc_jax.report`).

split.protocol='paper' is the published study's LEAKY pipeline (`paper_pool`): in
its GAN regimes the test split holds synthetic images; such results and summary rows
are marked LEAKY_NOTE and break the test metrics down into real and synthetic images.

A run whose results.json exists is skipped; an interrupted run resumes from its
latest checkpoint, so the same command finishes an interrupted ablation.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import jax
import numpy as np

from wbc_jax import floor
from wbc_jax import input_pipeline as ip
from wbc_jax import located
from wbc_jax import measures
from wbc_jax import metrics as metrics_lib
from wbc_jax import models
from wbc_jax import names
from wbc_jax import report
from wbc_jax import rundir
from wbc_jax import sharding
from wbc_jax import train
from wbc_jax import training_set
from wbc_jax import utils
from wbc_jax.gan import sample as gan_sample
from wbc_jax.gan import train as gan_train

# How every result of the paper protocol whose test split holds synthetic images is marked.
LEAKY_NOTE = 'LEAKY (test includes synthetic images)'


def validate(config) -> None:
  """Fails early, with the field's name, on names the driver does not know."""
  for regime in config.ablation.regimes:
    names.regime(regime)
  for model in config.ablation.models:
    if model not in names.MODEL_NAMES:
      raise ValueError(f'config.ablation.models: unknown model {model!r}; expected one of '
                       f'{", ".join(names.MODEL_NAMES)}.')
  for view in config.ablation.views:
    if view not in ip.VIEWS:
      raise ValueError(f'config.ablation.views: unknown view {view!r}; expected one of '
                       f'{", ".join(ip.VIEWS)}.')
  located.check_views(config.ablation.views, config.ablation.models, models.MODEL_LABELS,
                      [r for r in config.ablation.regimes if names.regime(r).gan])
  if config.split.protocol not in ip.PROTOCOLS:
    raise ValueError(f'config.split.protocol: unknown protocol {config.split.protocol!r}; '
                     f'expected one of {", ".join(ip.PROTOCOLS)}.')
  if config.num_seeds < 1:
    raise ValueError(f'config.num_seeds must be >= 1, got {config.num_seeds}.')
  gan_work = [r for r in config.ablation.regimes if names.regime(r).gan]
  if gan_work:
    gan_train.check_gan_config(config.gan)
    _check_resolution(config.gan.resolution, 'config.gan.resolution')
    for view, resolution in config.gan.resolution_by_view.items():
      _check_resolution(resolution, f'config.gan.resolution_by_view.{view}')
  if config.synthetic.measures:
    gan_work.append('synthetic.measures')
  if gan_work and sharding.process_count() > 1:
    # GAN training and the measures are single-process code: under several processes each
    # would train the same GAN and write the same files. Refuse rather than race.
    raise ValueError(f'{", ".join(gan_work)}: GAN training runs in one process only; this run '
                     f'has {sharding.process_count()} processes. Run the GAN regimes (or the '
                     'measures) in one process, or drop them from config.ablation.regimes.')


def _check_resolution(resolution, name: str) -> None:
  resolution = tuple(resolution)
  if resolution and (len(resolution) != 2 or any(int(r) != r or r < 4 or r % 4
                                                 for r in resolution)):
    raise ValueError(f'{name}: expected () or (height, width), each a positive multiple of '
                     f'4, got {resolution!r}')


def gan_resolution(gan_config, view: str, size: Sequence[int]) -> tuple[int, int]:
  """(height, width) a GAN of `view` trains at: gan_config.resolution_by_view[view], else
  gan_config.resolution, else `size` (the classifier's input); () means "not set"."""
  chosen = (tuple(gan_config.resolution_by_view.get(view, ())) or tuple(gan_config.resolution)
            or tuple(size))
  return int(chosen[0]), int(chosen[1])


def run(config, workdir: str, log: Callable = print) -> list[dict]:
  """Runs (or finishes) the whole ablation; returns one summary row per run."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  if sharding.is_primary():  # one writer; with several processes all compute the same
    utils.write_atomic(os.path.join(workdir, rundir.CONFIG),
                       config.to_json_best_effort(indent=2))
  t0 = time.time()
  jobs = []
  for view in config.ablation.views:
    data_config = config.data.copy_and_resolve_references()
    with data_config.unlocked():
      data_config.view = view
    examples = ip.load_examples(data_config)
    splits = ip.make_splits(examples.labels, config.split)
    if config.split.max_splits > 0:
      splits = splits[:config.split.max_splits]
    if sharding.is_primary():
      utils.write_json(rundir.splits_path(workdir, view), {
          s.name: {part: examples.image_ids[getattr(s, part)].tolist()
                   for part in ('train', 'val', 'test')} for s in splits})
    for split in splits:
      for regime in config.ablation.regimes:
        for model in config.ablation.models:
          jobs.append((view, examples, split, regime, model))

  rows = []
  for i, (view, examples, split, regime, model) in enumerate(jobs):
    rdir = rundir.run_dir(workdir, view, split.name, regime, model)
    results_path = os.path.join(rdir, rundir.RESULTS)
    tag = f'[{i + 1}/{len(jobs)}] {view} {split.name} {regime} {model}'
    if os.path.exists(results_path):
      log(f'{tag}: complete, skipped')
      results = utils.read_json(results_path)
    elif view == located.VIEW:
      results = located_run(config, workdir, examples, split, regime, model, rdir, tag, log)
      if sharding.is_primary():
        utils.write_json(results_path, results)
    else:
      extra, run_examples, run_split = None, examples, split
      uses = names.regime(regime)
      leaky = uses.gan and config.split.protocol == 'paper'
      if leaky:
        run_examples, run_split = paper_pool(config, workdir, view, examples, log)
        log(f'{tag}: training {config.num_seeds} seeds x {config.train.epochs} epochs on '
            f'{len(run_split.train)} pooled images; {LEAKY_NOTE}: val {len(run_split.val)} and '
            f'test {len(run_split.test)} images drawn from the pool of real and synthetic images')
      else:
        if uses.gan:
          extra = synthetic_images(config, workdir, view, examples, split, log)
        n_extra = 0 if extra is None else len(extra[1])
        n_fit = len(split.train if model == floor.NAME  # the floor chooses on validation
                    else training_set.fit_indices(split, config.train))
        log(f'{tag}: training {config.num_seeds} seeds x {config.train.epochs} epochs '
            f'on {n_fit} real' + (f' + {n_extra} synthetic' if extra is not None else '')
            + f' images (val {len(split.val)}'
            + (', trained on too' if n_fit > len(split.train) else '')
            + f'; test {len(split.test)}: real only)')
      # The floor is scikit-learn on hand-made features, with the same signature.
      train_fn = floor.train_and_evaluate if model == floor.NAME else train.train_and_evaluate
      results = train_fn(
          rundir.run_config(config, view, regime, model), rdir, examples=run_examples,
          split=run_split, model_name=model, augment=uses.trad, extra=extra, log=log)
      results.update(view=view, regime=regime)
      if config.split.protocol == 'paper':
        results.update(paper_labels(rdir, run_examples, run_split))
      if sharding.is_primary():
        utils.write_json(results_path, results)
    rows.append(summary_row(results, view, regime))
    elapsed = time.time() - t0
    row = rows[-1]
    log(f'{tag}: test acc {row["test_acc_mean"]:.3f} (ensemble {row["test_acc_ens"]:.3f}),'
        f' balanced {row["test_bacc_mean"]:.3f}; elapsed {utils.format_duration(elapsed)}')
  if config.synthetic.measures:  # after every split's 'original' CNN has trained
    measures.measure_workdir(workdir, config=config, log=log)
  write_summary(workdir, rows, config)
  if sharding.is_primary():  # the report reads results.json, which process 0 writes
    report.write_report(workdir, command=utils.invocation(), n_boot=config.report.n_boot,
                        log=log)
  log(f'ablation done in {utils.format_duration(time.time() - t0)}: '
      f'{os.path.join(workdir, "summary.md")}')
  return rows


def located_run(config, workdir: str, examples: ip.Examples, split: ip.Split, regime: str,
                model: str, rdir: str, tag: str, log: Callable = print) -> dict:
  """One run of the located view (`wbc_jax.located`); returns results.json's contents.
  Real-image regimes only (`validate` refuses the GAN regimes with the located view)."""
  raw = ip.load_raw(config.data)
  run_examples, found = located.located_examples(config, workdir, raw, examples, split, log)
  run_config = rundir.run_config(config, located.VIEW, regime, model)
  if model == floor.NAME:
    log(f'{tag}: fitting the floor on the training crops; validation and test cropped where '
        'the localiser found the cell')
    results = floor.train_and_evaluate(run_config, rdir, examples=run_examples, split=split,
                                       model_name=model, augment=names.regime(regime).trad,
                                       log=log)
    results['located'] = {'test_localisation': found['test_localisation']}
  else:
    crop_rdir = rundir.run_dir(workdir, 'crop', split.name, regime, model)
    if not rundir.is_finished(crop_rdir):
      raise ValueError(f'{crop_rdir}: not finished; the located view evaluates the crop '
                       'view\'s trained run of the same split, regime and model.')
    log(f'{tag}: the crop run {crop_rdir} on crops where the localiser found the cell')
    results = located.evaluate_crop_run(crop_rdir, rdir, run_examples, split, found, run_config)
  results.update(view=located.VIEW, regime=regime)
  return results


def synthetic_images(config, workdir: str, view: str, examples: ip.Examples, split: ip.Split,
                     log: Callable = print) -> tuple[np.ndarray, np.ndarray]:
  """Synthetic training images for one split: (uint8 [M, H, W, 3], labels [M]).

  The GAN sees the split's training images only (not validation, not test); only
  `paper_pool` passes a split whose training part is every image. It is trained once
  per (view, split) and cached, with its samples, so every regime and model of that
  split reuses it. Each class is topped up to `synthetic.target_per_class` training
  images.
  """
  gan_dir = rundir.gan_dir(workdir, view, split.name, config.gan.kind)
  cache = os.path.join(gan_dir, rundir.SYNTHETIC)
  if os.path.exists(cache):
    with np.load(cache) as z:
      return z['images'], z['labels']
  num_classes = len(examples.class_names)
  real_x, real_y = examples.images[split.train], examples.labels[split.train]
  size = tuple(real_x.shape[1:3])
  gan_size = gan_resolution(config.gan, view, size)
  at = ('' if gan_size == size else
        f' at {gan_size[0]}x{gan_size[1]} (resized from {size[0]}x{size[1]})')
  log(f'  GAN ({config.gan.kind}, {config.gan.steps} steps) on {len(real_y)} training images '
      f'of {view} {split.name}{at}')
  gan_x = gan_sample.resize_images(real_x.astype(np.float32) / 255.0, gan_size)
  state = gan_train.train_gans(config.gan, gan_x, real_y,
                               num_classes=num_classes, seeds=[config.synthetic.gan_seed],
                               workdir=gan_dir, log=lambda s: log('    ' + s))
  counts = np.bincount(real_y, minlength=num_classes)
  need = np.maximum(config.synthetic.target_per_class - counts, 0)
  key = jax.random.fold_in(jax.random.PRNGKey(config.synthetic.gan_seed), 0x5A4D)
  images, labels = gan_sample.generate(state, config.gan, num_per_class=need.tolist(), key=key,
                                      height=gan_size[0], width=gan_size[1],
                                      num_classes=num_classes)
  images = gan_sample.resize_images(images, size)  # the classifier's input size
  images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  buf_path = cache + '.tmp.npz'
  np.savez(buf_path, images=images, labels=labels)
  os.replace(buf_path, cache)  # complete or absent, never half-written
  log(f'  synthetic images per class: {dict(zip(examples.class_names, need.tolist()))}')
  return images, labels


def paper_pool(config, workdir: str, view: str, examples: ip.Examples,
               log: Callable = print) -> tuple[ip.Examples, ip.Split]:
  """The published study's pipeline, LEAKY: generate first, then split.

  A GAN trained on every image of the view (cached in WORKDIR/<view>/paper/gan_<kind>/)
  tops each class up to `synthetic.target_per_class`; its samples are pooled with the real
  images and only then is the pool split (85/15 stratified, validation carved from the
  training part), so validation and test hold synthetic images, made by a GAN that saw
  the real test images. Kept only to measure how much of the study's numbers that explains.
  Returns the pool (with `is_synthetic`) and its split.
  """
  everything = ip.Split('paper', train=np.arange(len(examples)), val=np.zeros(0, np.int64),
                        test=np.zeros(0, np.int64))
  images, labels = synthetic_images(config, workdir, view, examples, everything, log)
  pool = ip.pool_with_synthetic(examples, images, labels)
  (split,) = ip.make_splits(pool.labels, config.split)
  gan_dir = rundir.gan_dir(workdir, view, 'paper', config.gan.kind)
  utils.write_json(os.path.join(gan_dir, 'pool_split.json'),
                   {part: pool.image_ids[getattr(split, part)].tolist()
                    for part in ('train', 'val', 'test')})
  return pool, split


def paper_labels(rdir: str, examples: ip.Examples, split: ip.Split) -> dict:
  """What results.json of a paper-protocol run adds: the protocol, whether its test split
  holds synthetic images ('leaky'), their share, and the test metrics on the real and on
  the synthetic test images apart (per seed, seed summary, ensemble), from the run's
  predictions.npz. A non-GAN regime's split is the holdout one of real images (as the
  study's), so it is not leaky.
  """
  synthetic = (np.zeros(len(split.test), bool) if examples.is_synthetic is None
               else examples.is_synthetic[split.test])
  out = {'protocol': 'paper', 'leaky': bool(synthetic.any()),
         'test_synthetic_fraction': float(synthetic.mean()),
         'n_test_synthetic': int(synthetic.sum())}
  if examples.is_synthetic is not None:
    # train_and_evaluate counts the whole pooled training split as real.
    in_train = examples.is_synthetic[split.train]
    out.update(n_train_real=int((~in_train).sum()), n_train_extra=int(in_train.sum()))
  with np.load(os.path.join(rdir, rundir.PREDICTIONS)) as z:
    probs, labels = z['test_probs'], z['test_labels']
  out['test_by_source'] = {}
  for source, mask in (('real', ~synthetic), ('synthetic', synthetic)):
    if mask.any():
      per_seed = [metrics_lib.classification_metrics(labels[mask], p[mask], examples.class_names)
                  for p in probs]
      out['test_by_source'][source] = {
          'per_seed': per_seed, 'seed_summary': metrics_lib.summarize_seeds(per_seed),
          'ensemble': metrics_lib.classification_metrics(
              labels[mask], metrics_lib.ensemble_probs(probs[:, mask]), examples.class_names)}
  return out


def summary_row(results: dict, view: str, regime: str) -> dict:
  test = results['splits']['test']
  s = test['seed_summary']
  row = {
      'view': view, 'split': results['split'], 'regime': regime, 'model': results['model'],
      'seeds': len(results['seeds']), 'n_train': results['n_train_real'],
      'n_synthetic': results['n_train_extra'], 'n_test': test['ensemble']['n'],
      'test_acc_mean': s['accuracy']['mean'], 'test_acc_std': s['accuracy']['std'],
      'test_bacc_mean': s['balanced_accuracy']['mean'],
      'test_bacc_std': s['balanced_accuracy']['std'],
      'test_f1_mean': s['macro_f1']['mean'],
      'test_acc_ens': test['ensemble']['accuracy'],
      'test_bacc_ens': test['ensemble']['balanced_accuracy'],
      'val_acc_best': float(np.mean(results['best_val_accuracy'])),
      'majority_acc': results['majority_baseline']['accuracy'],
      'majority_bacc': results['majority_baseline']['balanced_accuracy'],
      'train_seconds': results['train_seconds'],
  }
  if results.get('protocol') == 'paper':
    real = results['test_by_source']['real']
    row.update(protocol='paper', leaky=results['leaky'],
               note=LEAKY_NOTE if results['leaky'] else '',
               test_synthetic_fraction=results['test_synthetic_fraction'],
               test_acc_real_mean=real['seed_summary']['accuracy']['mean'],
               test_acc_real_ens=real['ensemble']['accuracy'],
               test_bacc_real_ens=real['ensemble']['balanced_accuracy'])
  return row


def write_summary(workdir: str, rows: list[dict], config) -> None:
  if not sharding.is_primary():
    return
  utils.write_json(os.path.join(workdir, 'summary.json'), rows)
  cols = ['view', 'split', 'regime', 'model', 'seeds', 'n_train', 'n_synthetic', 'n_test',
          'test_acc_mean', 'test_acc_std',
          'test_bacc_mean', 'test_f1_mean', 'test_acc_ens', 'test_bacc_ens', 'val_acc_best',
          'majority_acc', 'majority_bacc', 'train_seconds']
  headers = ['view', 'split', 'regime', 'model', 'seeds', 'train n', 'synthetic n', 'test n',
             'test acc (mean)', 'acc sd',
             'test bal. acc', 'test macro-F1', 'test acc (ensemble)', 'bal. acc (ensemble)',
             'best val acc', 'majority acc', 'majority bal. acc', 'train s']
  pct = {'test_acc_mean', 'test_acc_std', 'test_bacc_mean', 'test_f1_mean', 'test_acc_ens',
         'test_bacc_ens', 'val_acc_best', 'majority_acc', 'majority_bacc'}
  scope = 'Real held-out test images only'
  if any(r.get('protocol') == 'paper' for r in rows):
    # The mark beside the model, where a reader of the row cannot miss it.
    cols, headers = cols[:4] + ['note'] + cols[4:], headers[:4] + ['note'] + headers[4:]
    paper_cols = {'test_synthetic_fraction': 'synthetic share of test',
                  'test_acc_real_mean': 'acc on real test (mean)',
                  'test_acc_real_ens': 'acc on real test (ensemble)',
                  'test_bacc_real_ens': 'bal. acc on real test (ensemble)'}
    cols, headers = cols + list(paper_cols), headers + list(paper_cols.values())
    pct |= set(paper_cols)
    scope = (f'Rows marked {LEAKY_NOTE} follow the published study: a GAN trained on every '
             'image, its samples pooled with the real images, then the pool split, so their '
             'test images are partly synthetic; the "real test" columns count the real test '
             'images alone. Other rows: real held-out test images only')
  table = metrics_lib.format_markdown_table(rows, cols, headers=headers, percent_columns=pct)
  text = (f'# Ablation summary\n\n{scope}; "mean" is over seeds, "ensemble" '
          'averages the seeds\' probabilities. The majority baseline always predicts the most '
          f'frequent training class.\n\nProtocol: {config.split.protocol}; '
          f'seeds: {config.num_seeds}; '
          f'epochs: {config.train.epochs}.\n\n' + table + '\n')
  utils.write_atomic(os.path.join(workdir, 'summary.md'), text)
