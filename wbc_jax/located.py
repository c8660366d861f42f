"""The 'located' view: a whole smear to a cell type, with no annotated box at test time.

  frame -> localiser (fitted on the split's training boxes) -> crop where it found the cell
        -> the crop classifier (trained on the annotated training crops) -> label

Per split, the localiser (`wbc_jax.localise`) is fitted on the training frames' WBC boxes only
(never a validation or test box) and kept in WORKDIR/located/<split>/localiser/ with its
detections on the split's validation and test frames. The located view's validation and test
images are the crops at the most confident detection, made exactly as the crop view makes them
from an annotated box (`crops.crop_cells`); its training images are the crop view's.

A deep model of the located view is the crop view's trained run of the same split, regime and
model, evaluated again on the located images (no second training: the classifier is the same,
only its inputs change); the non-deep floor, seconds to fit, is refitted on them. Its run
directory holds results.json and predictions.npz like any other, so the report pools and
compares it; results.json adds 'located': the crop run it evaluates and the localiser's hit
rate on the split's test frames.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from wbc_jax import crops
from wbc_jax import input_pipeline as ip
from wbc_jax import localise
from wbc_jax import metrics as metrics_lib
from wbc_jax import rundir
from wbc_jax import utils

VIEW = rundir.LOCATED_VIEW
DETECTIONS = 'detections.json'


def check_views(views, models, deep_models, gan_regimes=()) -> None:
  """A deep model's located run evaluates its crop run: 'crop' must come before 'located';
  and the located view runs the real-image regimes only (gan_regimes: those with GAN images)."""
  views = tuple(views)
  if VIEW in views and gan_regimes:
    raise ValueError(f"config.ablation.views: the located view runs the real-image regimes "
                     f"only; drop {', '.join(gan_regimes)} from config.ablation.regimes or "
                     "'located' from the views.")
  if VIEW not in views or not any(m in deep_models for m in models):
    return
  if 'crop' not in views or views.index('crop') > views.index(VIEW):
    raise ValueError(f"config.ablation.views: {views!r} has 'located' without 'crop' before "
                     "it; the located view evaluates the crop view's trained classifiers, so "
                     "list 'crop' first, e.g. ('crop', 'located').")


def fit_or_load(config, workdir: str, raw: dict, split: ip.Split,
                log: Callable = print) -> localise.Localiser:
  """The split's localiser: fitted on its training frames' boxes, or read back."""
  directory = rundir.localiser_dir(workdir, split.name)
  if os.path.isfile(os.path.join(directory, 'localiser.json')):
    return localise.Localiser.load(directory)
  train = np.asarray(split.train)
  log(f'  localiser: fitting on the WBC boxes of {len(train)} training frames of {split.name}')
  net = localise.fit_localiser(raw['images'][train], [raw['boxes'][i] for i in train],
                               config.localiser, seed=config.seed, log=log)
  net.save(directory)
  return net


def locate(config, workdir: str, raw: dict, split: ip.Split, log: Callable = print) -> dict:
  """Detections on the split's validation and test frames (cached in detections.json):
  {'val'|'test': {'boxes': [n][4] (the most confident detection), 'scores': [n]},
   'test_localisation': `localise.score_detections` of the test frames, without rows}."""
  directory = rundir.localiser_dir(workdir, split.name)
  path = os.path.join(directory, DETECTIONS)
  if os.path.isfile(path):
    return utils.read_json(path)
  net = fit_or_load(config, workdir, raw, split, log)
  out = {}
  for part in ('val', 'test'):
    index = np.asarray(getattr(split, part))
    found = localise.detect(net, raw['images'][index])
    out[part] = {'image_ids': raw['image_ids'][index].tolist(),
                 'boxes': [d.boxes[0].tolist() for d in found],
                 'scores': [float(d.scores[0]) for d in found]}
    if part == 'test':
      scored = localise.score_detections(found, [raw['boxes'][i] for i in index], net.threshold)
      out['test_localisation'] = {k: v for k, v in scored.items() if k != 'rows'}
      out['test_localisation']['iou'] = [r['iou'] for r in scored['rows']]
  utils.write_json(path, out)
  loc = out['test_localisation']
  log(f'  localiser on {loc["frames"]} test frames of {split.name}: hit rate '
      f'{loc["hit_rate"]:.3f}, median centre error {loc["median_centre_error_px"]:.1f} px, '
      f'none found {loc["none_found"]}, several {loc["several_found"]}')
  return out


def located_examples(config, workdir: str, raw: dict, examples: ip.Examples, split: ip.Split,
                     log: Callable = print) -> tuple[ip.Examples, dict]:
  """The crop view's examples with the split's validation and test images replaced by the
  crops at the localiser's detections; and the detections."""
  found = locate(config, workdir, raw, split, log)
  images = examples.images.copy()
  for part in ('val', 'test'):
    index = np.asarray(getattr(split, part))
    if not len(index):
      continue
    if not np.array_equal(examples.image_ids[index], found[part]['image_ids']):
      raise ValueError(f'{rundir.localiser_dir(workdir, split.name)}/{DETECTIONS}: its '
                       f'{part} image ids differ from split {split.name}; delete the file '
                       'to detect again.')
    boxes = [np.asarray(b, np.float32)[None] for b in found[part]['boxes']]
    images[index] = crops.crop_cells(raw['images'][index], boxes, config.data)
  return ip.Examples(images, examples.labels, examples.image_ids, examples.class_names), found


def evaluate_crop_run(crop_rdir: str, rdir: str, examples: ip.Examples, split: ip.Split,
                      found: dict, run_config) -> dict:
  """The crop run's trained seeds evaluated on the located validation and test images.

  Writes rdir/config.json and predictions.npz; returns results.json's contents (the caller
  writes it, last). The training-set figures and the selection stay the crop run's.
  """
  run = rundir.restore_run(crop_rdir)
  os.makedirs(rdir, exist_ok=True)
  utils.write_atomic(os.path.join(rdir, rundir.CONFIG), run_config.to_json_best_effort(indent=2))
  results = {k: v for k, v in run.results.items() if k != 'test_variants'}
  results['splits'] = dict(results['splits'])
  arrays = {}
  for part in ('val', 'test'):
    index = np.asarray(getattr(split, part))
    probs = run.predict_seeds(examples.images[index])
    labels = examples.labels[index]
    results['splits'][part] = metrics_lib.split_metrics(labels, probs, examples.class_names)
    arrays.update({f'{part}_probs': probs, f'{part}_labels': labels,
                   f'{part}_image_ids': examples.image_ids[index]})
  np.savez(os.path.join(rdir, rundir.PREDICTIONS), **arrays)
  results['located'] = {'crop_run': os.path.relpath(crop_rdir, os.path.dirname(rdir)),
                        'test_localisation': found['test_localisation']}
  return results


def localisation_summary(runs) -> list[dict]:
  """The localisers' test-frame scores of the located view's runs (`rundir.Run`), pooled per
  protocol over splits (each split's localiser counted once, whatever its models)."""
  by_protocol: dict[str, dict[str, dict]] = {}
  for run in runs:
    found = run.results.get('located', {}).get('test_localisation')
    if run.view == VIEW and found:
      by_protocol.setdefault(run.protocol, {})[run.split] = found
  out = []
  for protocol, splits in sorted(by_protocol.items()):
    frames = sum(s['frames'] for s in splits.values())
    ious = [v for s in splits.values() for v in s.get('iou', [])]
    out.append({'protocol': protocol, 'splits': len(splits), 'frames': frames,
                'hits': int(round(sum(s['hit_rate'] * s['frames'] for s in splits.values()))),
                'hit_rate': sum(s['hit_rate'] * s['frames'] for s in splits.values())
                / max(frames, 1),
                'mean_iou': float(np.mean(ious)) if ious else float('nan'),
                'none_found': sum(s['none_found'] for s in splits.values()),
                'several_found': sum(s['several_found'] for s in splits.values())})
  return out


def localisation_markdown(summary: list[dict]) -> str:
  if not summary:
    return ''
  lines = ['## Finding the cell (located view)', '',
           "Each split's localiser was fitted on its training frames' WBC boxes only and scored "
           'on its test frames, each frame once per repeat. Hit: the most confident detection '
           'has IoU >= 0.5 with the annotated box. None / several: frames with no detection '
           'above the threshold (the best peak is still cropped) / with two or more.', '',
           '| protocol | splits | test frames | hit rate % | mean IoU | none found | '
           'several found |', '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for s in summary:
    lines.append(f"| {s['protocol']} | {s['splits']} | {s['frames']} | "
                 f"{100 * s['hit_rate']:.1f} ({s['hits']}) | {s['mean_iou']:.3f} | "
                 f"{s['none_found']} | {s['several_found']} |")
  return '\n'.join(lines) + '\n\n'
