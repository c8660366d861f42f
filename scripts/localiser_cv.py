r"""How well the WBC is found on test frames: the localiser network and the classical baseline,
each fitted on the training images of every split of a config's protocol, scored on that
split's test frames.

  python scripts/localiser_cv.py --config=configs/baseline.py:cv --max_splits=5 \
      --workdir=workdirs/localiser_cv --out=experiments/localiser

Each finished split is written to WORKDIR/<split>.json (a cut-off run resumes from them);
OUT/README.md gets the table (per split and pooled over the test frames) and OUT/results.json
every number. Hit: the most confident detection has IoU >= 0.5 with an annotated WBC box.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wbc_jax import input_pipeline as ip  # noqa: E402
from wbc_jax import localise  # noqa: E402
from wbc_jax import utils  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/baseline.py:cv',
                                          'The config whose splits and localiser settings to use.')
_MAX_SPLITS = flags.DEFINE_integer('max_splits', 5, 'Only the first n splits (<= 0: all).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where each finished split is kept.')
_OUT = flags.DEFINE_string('out', None, 'Where README.md and results.json go.')


def run_split(raw, split, config) -> dict:
  frames, boxes = raw['images'], raw['boxes']
  train = split.train  # training images only: never a validation or test box
  test_boxes = [boxes[i] for i in split.test]
  out = {'split': split.name, 'n_train': int(len(train)), 'n_test': int(len(split.test))}
  start = time.perf_counter()
  classical = localise.fit_classical(frames[train], [boxes[i] for i in train],
                                     config.localiser.input_hw)
  found = classical.detect(frames[split.test])
  out['classical'] = localise.score_detections(found, test_boxes, threshold=0.0)
  out['classical']['fit_seconds'] = time.perf_counter() - start
  out['classical']['scale'] = classical.scale
  net = localise.fit_localiser(frames[train], [boxes[i] for i in train], config.localiser,
                               seed=config.seed, log=print)
  found = localise.detect(net, frames[split.test])
  out['network'] = localise.score_detections(found, test_boxes, config.localiser.threshold)
  out['network']['fit_seconds'] = net.train_seconds
  return out


def summarise(per_split: list[dict]) -> dict:
  summary = {}
  for kind in ('network', 'classical'):
    rows = [r for s in per_split for r in s[kind]['rows']]
    centre = np.array([r['centre_px'] for r in rows], np.float64)
    summary[kind] = {
        'frames': len(rows),
        'hits': int(sum(r['hit'] for r in rows)),
        'hit_rate': float(np.mean([r['hit'] for r in rows])),
        'mean_iou': float(np.mean([r['iou'] for r in rows])),
        'median_centre_error_px': float(np.nanmedian(centre)),
        'p90_centre_error_px': float(np.nanpercentile(centre, 90)),
        'none_found': int(sum(r['found'] == 0 for r in rows)),
        'several_found': int(sum(r['found'] >= 2 for r in rows)),
        'mean_fit_seconds': float(np.mean([s[kind]['fit_seconds'] for s in per_split])),
    }
  return summary


def markdown(per_split, summary, header) -> str:
  lines = ['# Finding the WBC on test frames', '',
           f'- Command: `{header["command"]}`',
           f'- Machine: {header["machine"]}; date {header["date"]}; wall time {header["wall"]}',
           f'- Splits: {", ".join(s["split"] for s in per_split)} (fitted on each split\'s '
           'training images; scored on its test frames, each frame once)', '',
           'Hit: the most confident detection overlaps an annotated WBC box with IoU >= 0.5. '
           'Centre error: pixels of the 640x480 frame to the nearest annotated centre. None / '
           'several: frames with no detection / two or more above the threshold.', '',
           '| localiser | frames | hit rate % | mean IoU | median / p90 centre error (px) | none | '
           'several | fit time per split (s) |', '| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |']
  for kind, name in (('network', 'network (wbc_jax.localise.CentreNet)'),
                     ('classical', 'classical (violet nucleus, fitted scale)')):
    s = summary[kind]
    lines.append(f'| {name} | {s["frames"]} | {100 * s["hit_rate"]:.1f} ({s["hits"]}) | '
                 f'{s["mean_iou"]:.3f} | {s["median_centre_error_px"]:.1f} / '
                 f'{s["p90_centre_error_px"]:.1f} | {s["none_found"]} | {s["several_found"]} | '
                 f'{s["mean_fit_seconds"]:.0f} |')
  lines += ['', '| split | network hit % | classical hit % | network misses (IoU) |',
            '| --- | ---: | ---: | --- |']
  for s in per_split:
    misses = [f'{r["iou"]:.2f}' for r in s['network']['rows'] if not r['hit']]
    lines.append(f'| {s["split"]} | {100 * s["network"]["hit_rate"]:.1f} | '
                 f'{100 * s["classical"]["hit_rate"]:.1f} | {", ".join(misses) or "-"} |')
  return '\n'.join(lines) + '\n'


def main(argv) -> None:
  del argv
  config, workdir, out_dir = _CONFIG.value, _WORKDIR.value, _OUT.value
  start = time.perf_counter()
  raw = ip.load_raw(config.data)
  splits = ip.make_splits(raw['labels'], config.split)
  if _MAX_SPLITS.value > 0:
    splits = splits[:_MAX_SPLITS.value]
  os.makedirs(workdir, exist_ok=True)
  per_split = []
  for i, split in enumerate(splits):
    path = os.path.join(workdir, f'{split.name}.json')
    if os.path.isfile(path):
      per_split.append(utils.read_json(path))
      print(f'[{i + 1}/{len(splits)}] {split.name}: done before, read {path}')
      continue
    print(f'[{i + 1}/{len(splits)}] {split.name}: fitting on {len(split.train)} training frames')
    result = run_split(raw, split, config)
    utils.write_json(path, result)
    print(f'[{i + 1}/{len(splits)}] {split.name}: network hit rate '
          f'{result["network"]["hit_rate"]:.3f}, classical {result["classical"]["hit_rate"]:.3f}')
    per_split.append(result)
  summary = summarise(per_split)
  header = {'command': 'python scripts/localiser_cv.py ' + shlex.join(sys.argv[1:]),
            'machine': f'{utils.cpu_model()}, {os.cpu_count()} CPUs',
            'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
            'wall': f'{time.perf_counter() - start:.0f} s (this invocation; splits finished '
                    'before are read back, not refitted)'}
  os.makedirs(out_dir, exist_ok=True)
  utils.write_json(os.path.join(out_dir, 'results.json'),
                   {'header': header, 'summary': summary, 'splits': per_split})
  utils.write_atomic(os.path.join(out_dir, 'README.md'), markdown(per_split, summary, header))
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
