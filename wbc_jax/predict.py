r"""Classify smear images with a trained run: the ensemble of its seeds.

  python -m wbc_jax.predict --workdir=RUN_DIR IMAGE.jpg [IMAGE.jpg ...] [--output=preds.csv]

RUN_DIR is one run of the ablation (it holds results.json and checkpoints/). Each seed's
validation-selected parameters are used and their probabilities averaged. For a run of
the `crop` view each image needs its WBC box: a Pascal VOC file with the same name and
`.xml` beside the image, or `--box=ymin,xmin,ymax,xmax` in pixels (one image only).
"""

from __future__ import annotations

import csv
import os
import sys

import numpy as np
from absl import app
from absl import flags
from absl import logging

from wbc_jax import bccd_wbc
from wbc_jax import input_pipeline as ip
from wbc_jax import rundir

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A run directory (holds results.json and checkpoints/).')
flags.DEFINE_string('output', None, 'Write CSV here instead of standard output.')
flags.DEFINE_string('box', None, 'WBC box "ymin,xmin,ymax,xmax" in pixels (crop view, one image).')


class PredictError(ValueError):
  pass


def read_image(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise PredictError(f'{path}: no such image file.')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    # TensorFlow's decoder, as the TFDS dataset uses: JPEG decoders differ in the last bits.
    import tensorflow as tf
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except Exception as e:
    raise PredictError(f'{path}: not a readable image ({type(e).__name__}: {e}).') from e


def wbc_boxes_for(path: str, shape, box_flag: str | None) -> np.ndarray:
  """Normalised WBC boxes [k, 4] for the crop view, from --box or a VOC XML beside the image."""
  h, w = shape[:2]
  if box_flag:
    try:
      y0, x0, y1, x1 = (float(v) for v in box_flag.split(','))
    except ValueError as e:
      raise PredictError(f'--box={box_flag!r}: expected four numbers ymin,xmin,ymax,xmax.') from e
    return _normalised(np.array([[y0 / h, x0 / w, y1 / h, x1 / w]]))
  xml = os.path.splitext(path)[0] + '.xml'
  if not os.path.isfile(xml):
    raise PredictError(f'{path}: this run uses the crop view, which needs the WBC box; expected '
                       f'a VOC annotation {xml} or --box=ymin,xmin,ymax,xmax.')
  with open(xml, 'rb') as f:
    boxes = bccd_wbc.parse_wbc_boxes(f.read(), xml)
  if not boxes:
    raise PredictError(f'{xml}: no WBC box in the annotation.')
  return _normalised(np.array([[y0 / h, x0 / w, y1 / h, x1 / w] for y0, x0, y1, x1 in boxes]))


def _normalised(boxes: np.ndarray) -> np.ndarray:
  # As the TFDS builder stores them (clipped to the frame, float32): the same box then gives
  # the same window, to the pixel, in prediction as in the dataset's view.
  return np.clip(boxes, 0.0, 1.0).astype(np.float32)


def predict_files(run_dir: str, paths: list[str], box: str | None = None) -> list[dict]:
  try:
    run = rundir.restore_run(run_dir)
  except rundir.RunDirError as e:
    raise PredictError(str(e)) from e
  config, class_names = run.config, run.class_names
  if box and len(paths) != 1:
    raise PredictError('--box applies to one image; give VOC XML files for several.')
  views = []
  for path in paths:
    frame = read_image(path)
    boxes = (wbc_boxes_for(path, frame.shape, box) if config.data.view == 'crop'
             else np.zeros((0, 4)))
    raw = {'images': frame[None], 'labels': np.zeros(1, np.int32),
           'image_ids': np.zeros(1, np.int32), 'boxes': [boxes], 'class_names': tuple(class_names)}
    views.append(ip.make_view(raw, config.data).images[0])
  probs = run.predict(np.stack(views))
  return [{'image': p, 'predicted': class_names[int(np.argmax(q))],
           **{f'p_{n}': float(v) for n, v in zip(class_names, q)}} for p, q in zip(paths, probs)]


def main(argv):
  logging.set_verbosity(logging.WARNING)
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give one or more image files after the flags.')
  try:
    rows = predict_files(FLAGS.workdir, paths, FLAGS.box)
  except (PredictError, bccd_wbc.BccdDataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  out = open(FLAGS.output, 'w', newline='') if FLAGS.output else sys.stdout
  writer = csv.DictWriter(out, fieldnames=list(rows[0]))
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (f'{v:.4f}' if isinstance(v, float) else v) for k, v in row.items()})
  if FLAGS.output:
    out.close()
    print(f'wrote {len(rows)} predictions to {FLAGS.output}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
