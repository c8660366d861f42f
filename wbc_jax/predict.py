r"""Classify smear images with a trained run: the ensemble of its seeds, one row per cell.

  python -m wbc_jax.predict --workdir=RUN_DIR IMAGE.jpg FOLDER/ ... [--output=preds.csv]

RUN_DIR is one run of the ablation (it holds results.json and checkpoints/), or a run of the
located view (it names the crop run it evaluates). Each seed's selected parameters are used
and their probabilities averaged. A folder stands for every image in it (.jpg, .jpeg, .png,
.bmp; not its subfolders).

A run of the crop view classifies the WBC cropped around a box. Where each box comes from,
first match wins (the CSV's box_source):
  flag        --box=ymin,xmin,ymax,xmax in pixels (one image only);
  annotation  a Pascal VOC file with the image's name and .xml beside it: one row per WBC box;
  localiser   the WBC localiser of the run's split (WORKDIR/located/<split>/localiser/, which
              `configs/baseline.py:quick` trains), or the one of --localiser=DIR: its most
              confident peak (as the located view, which was evaluated, classifies it; a 'note'
              says when it is below the localiser's threshold), and one more row per further
              cell above the threshold. With --min_score, a best peak below it is an error.
A run of the frame view classifies the whole frame (box_source 'frame').

An image that cannot be read, or where no cell is found, gets a row with its error and the
other images are still classified; the exit status is then 1. Bad flags or a bad RUN_DIR:
exit status 2, no rows.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys

import numpy as np
from absl import app
from absl import flags
from absl import logging

from wbc_jax import bccd_wbc
from wbc_jax import crops
from wbc_jax import input_pipeline as ip
from wbc_jax import localise
from wbc_jax import rundir
from wbc_jax import utils

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A run directory (holds results.json and checkpoints/).')
flags.DEFINE_string('output', None, 'Write CSV here instead of standard output.')
flags.DEFINE_string('box', None, 'WBC box "ymin,xmin,ymax,xmax" in pixels (crop view, one image).')
flags.DEFINE_string('localiser', None, 'A localiser directory (localiser.json, .msgpack) to '
                    'find cells with, instead of the one stored with the run.')
flags.DEFINE_integer('batch_images', 32, 'Images read and classified at a time.')
flags.DEFINE_integer('max_pixels', 50_000_000, 'Larger images are refused before decoding.')
flags.DEFINE_float('min_score', 0.0, 'An image whose best localiser score is lower gets an error '
                   'row ("no WBC found") instead of a label.')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
BOX_FIELDS = ('box_ymin', 'box_xmin', 'box_ymax', 'box_xmax')


class PredictError(ValueError):
  pass


MIN_SIDE = 32


def read_image(path: str, max_pixels: int = 50_000_000) -> np.ndarray:
  """The image [H, W, 3] uint8; its size is checked from the header before decoding, so a huge
  image is refused without the memory its pixels would take."""
  if not os.path.isfile(path):
    raise PredictError(f'{path}: no such image file.')
  try:
    from PIL import Image
    with Image.open(path) as header:   # reads the header only
      w, h = header.size
  except Image.DecompressionBombError as e:  # PIL's own limit, above ours
    raise PredictError(f'{path}: {e} Refused before decoding.') from e
  except Exception as e:  # PIL raises several types for what is not an image.
    raise PredictError(f'{path}: not a readable image ({type(e).__name__}: {e}).') from e
  if h * w > max_pixels:
    raise PredictError(f'{path}: {w}x{h} pixels, more than --max_pixels={max_pixels}; '
                       'refused before decoding.')
  if min(h, w) < MIN_SIDE:
    raise PredictError(f'{path}: {w}x{h} pixels; expected at least {MIN_SIDE} on each side.')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    # TensorFlow's decoder, as the TFDS dataset uses: JPEG decoders differ in the last bits.
    import tensorflow as tf
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except Exception as e:
    raise PredictError(f'{path}: not a readable image ({type(e).__name__}: {e}).') from e


def expand_paths(paths: list[str]) -> list[str]:
  """Files as given; a folder becomes its image files, sorted. A folder with none is an error."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, n) for n in os.listdir(path)
                     if n.lower().endswith(IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(path, n)))
      if not found:
        raise PredictError(f'{path}: a folder with no image files '
                           f'({", ".join(IMAGE_EXTENSIONS)}).')
      out += found
    else:
      out.append(path)
  return out


def parse_box_flag(box_flag: str, shape) -> np.ndarray:
  h, w = shape[:2]
  try:
    y0, x0, y1, x1 = (float(v) for v in box_flag.split(','))
  except ValueError as e:
    raise PredictError(f'--box={box_flag!r}: expected four numbers ymin,xmin,ymax,xmax.') from e
  if not (y1 > y0 and x1 > x0):
    raise PredictError(f'--box={box_flag!r}: expected ymin < ymax and xmin < xmax.')
  box = _normalised(np.array([[y0 / h, x0 / w, y1 / h, x1 / w]]))
  if not (box[0, 2] > box[0, 0] and box[0, 3] > box[0, 1]):
    raise PredictError(f'--box={box_flag!r}: outside the {w}x{h} image.')
  return box


def annotated_boxes(path: str, shape) -> np.ndarray | None:
  """The WBC boxes [k, 4] (normalised, largest first) of the VOC file beside the image; None
  when there is no such file."""
  xml = os.path.splitext(path)[0] + '.xml'
  if not os.path.isfile(xml):
    return None
  h, w = shape[:2]
  with open(xml, 'rb') as f:
    boxes = bccd_wbc.parse_wbc_boxes(f.read(), xml)
  if not boxes:
    raise PredictError(f'{xml}: no WBC box in the annotation.')
  boxes = np.array([[y0 / h, x0 / w, y1 / h, x1 / w] for y0, x0, y1, x1 in boxes])
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  # Largest first: the dataset's crop view crops around the largest box of an image.
  return _normalised(boxes[np.argsort(-area, kind='stable')])


def _normalised(boxes: np.ndarray) -> np.ndarray:
  # As the TFDS builder stores them (clipped to the frame, float32): the same box then gives
  # the same window, to the pixel, in prediction as in the dataset's view.
  return np.clip(boxes, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass
class Cell:
  """One row of the output: a cell to classify, or an image's error."""
  image: str
  index: int = 0
  box: np.ndarray | None = None   # normalised [4]
  source: str = ''
  score: float | None = None
  error: str = ''
  note: str = ''
  frame_hw: tuple[int, int] = (0, 0)  # the image's size, for the box in pixels


class Predictor:
  """A restored run and, for the crop view, where its boxes come from."""

  def __init__(self, run_dir: str, localiser_dir: str | None = None, min_score: float = 0.0):
    self.min_score = float(min_score)
    self.run_dir = _trained_run_dir(run_dir)
    try:
      self.run = rundir.restore_run(self.run_dir)
    except rundir.RunDirError as e:
      raise PredictError(str(e)) from e
    self.config = self.run.config
    self.crop = self.config.data.view != 'frame'
    self.localiser_dir = localiser_dir or rundir.localiser_dir_of_run(self.run_dir)
    self._localiser = None
    if localiser_dir and not os.path.isfile(os.path.join(localiser_dir, 'localiser.json')):
      raise PredictError(f'--localiser={localiser_dir}: no localiser.json there; expected a '
                         'directory written by the located view (WORKDIR/located/<split>/'
                         'localiser).')

  def localiser(self, path: str) -> localise.Localiser:
    if self._localiser is None:
      if not os.path.isfile(os.path.join(self.localiser_dir, 'localiser.json')):
        raise PredictError(
            f'{path}: no WBC box (no {os.path.splitext(path)[0]}.xml, no --box), and the run '
            f'has no localiser ({self.localiser_dir} is missing); train with a config whose '
            "views include 'located' (configs/baseline.py:quick does), or pass --localiser=DIR.")
      self._localiser = localise.Localiser.load(self.localiser_dir)
    return self._localiser

  def cells(self, path: str, frame: np.ndarray, box_flag: str | None) -> list[Cell]:
    hw = tuple(frame.shape[:2])
    if not self.crop:
      return [Cell(path, source='frame', frame_hw=hw)]
    if box_flag:
      return [Cell(path, box=parse_box_flag(box_flag, hw)[0], source='flag', frame_hw=hw)]
    boxes = annotated_boxes(path, hw)
    if boxes is not None:
      return [Cell(path, i, b, 'annotation', frame_hw=hw) for i, b in enumerate(boxes)]
    net = self.localiser(path)
    (found,) = localise.detect(net, frame[None])
    if found.scores[0] < self.min_score:
      return [Cell(path, error=f'no WBC found (best localiser score {found.scores[0]:.2f} < '
                               f'--min_score={self.min_score:.2f})', frame_hw=hw)]
    # The most confident peak is always a cell, as in the located view that was evaluated;
    # further peaks count above the localiser's threshold.
    keep = found.scores >= net.threshold
    keep[0] = True
    note = (f'localiser score below its threshold {net.threshold:.2f}: the best peak, as the '
            'located view classifies it; perhaps no WBC' if found.scores[0] < net.threshold
            else '')
    return [Cell(path, i, b, 'localiser', float(s), frame_hw=hw, note=note if i == 0 else '')
            for i, (b, s) in enumerate(zip(found.boxes[keep], found.scores[keep]))]

  def classify(self, frames: list[np.ndarray], cells: list[Cell]) -> np.ndarray:
    """Probabilities [n, C] of the cells (cells[i] of frames[i])."""
    images = []
    for frame, cell in zip(frames, cells):
      if self.crop:
        images.append(crops.crop_cells(frame[None], [cell.box[None]], self.config.data)[0])
      else:
        raw = {'images': frame[None], 'labels': np.zeros(1, np.int32),
               'image_ids': np.zeros(1, np.int32), 'boxes': [np.zeros((0, 4))],
               'class_names': tuple(self.run.class_names)}
        images.append(ip.make_view(raw, self.config.data).images[0])
    return self.run.predict(np.stack(images))


def _trained_run_dir(run_dir: str) -> str:
  """A located run -> the crop run it evaluates (the one with checkpoints), as its results.json
  names it; any other run directory as it is."""
  path = os.path.join(run_dir, rundir.RESULTS)
  crop_run = (utils.read_json(path).get('located', {}).get('crop_run')
              if os.path.isfile(path) else None)
  # 'crop_run' is relative to the located run's parent (`located.evaluate_crop_run`).
  return os.path.normpath(os.path.join(run_dir, os.pardir, crop_run)) if crop_run else run_dir


def predict_files(run_dir: str, paths: list[str], box: str | None = None,
                  localiser_dir: str | None = None, batch_images: int = 32,
                  max_pixels: int = 50_000_000, min_score: float = 0.0) -> list[dict]:
  """One row per cell (and per failed image) of `paths` (files or folders), in order."""
  paths = expand_paths(paths)
  if box and len(paths) != 1:
    raise PredictError('--box applies to one image; give VOC XML files for several.')
  predictor = Predictor(run_dir, localiser_dir, min_score)
  class_names = predictor.run.class_names
  rows = []
  for start in range(0, len(paths), max(batch_images, 1)):
    frames, cells, failed = [], [], []
    for path in paths[start:start + batch_images]:
      try:
        frame = read_image(path, max_pixels)
        found = predictor.cells(path, frame, box)
      except (PredictError, bccd_wbc.BccdDataError) as e:
        found = [Cell(path, error=str(e))]
      for cell in found:
        (failed if cell.error else cells).append(cell)
        if not cell.error:
          frames.append(frame)
    probs = predictor.classify(frames, cells) if cells else np.zeros((0, len(class_names)))
    by_image = {}
    for cell, p in zip(cells, probs):
      by_image.setdefault(cell.image, []).append(_row(cell, p, class_names))
    for cell in failed:
      by_image.setdefault(cell.image, []).append(_row(cell, None, class_names))
    for path in paths[start:start + batch_images]:
      rows += by_image.pop(path, [])
  return rows


def _row(cell: Cell, probs, class_names) -> dict:
  row = {'image': cell.image, 'cell': cell.index, 'box_source': cell.source,
         'box_score': '' if cell.score is None else cell.score}
  row.update({k: '' for k in BOX_FIELDS})
  row.update({'predicted': '', **{f'p_{n}': '' for n in class_names}, 'note': cell.note,
              'error': cell.error})
  if probs is not None:
    row['predicted'] = class_names[int(np.argmax(probs))]
    row.update({f'p_{n}': float(v) for n, v in zip(class_names, probs)})
  if cell.box is not None:
    h, w = cell.frame_hw
    row.update(zip(BOX_FIELDS, (round(float(v) * s) for v, s in zip(cell.box, (h, w, h, w)))))
  return row


def main(argv):
  logging.set_verbosity(logging.WARNING)
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give one or more image files or folders after the flags.')
  try:
    out_dir = os.path.dirname(os.path.abspath(FLAGS.output)) if FLAGS.output else None
    if out_dir and not os.path.isdir(out_dir):
      raise PredictError(f'--output={FLAGS.output}: the directory {out_dir} does not exist.')
    rows = predict_files(FLAGS.workdir, paths, FLAGS.box, FLAGS.localiser, FLAGS.batch_images,
                         FLAGS.max_pixels, FLAGS.min_score)
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
  errors = [r for r in rows if r['error']]
  cells = len(rows) - len(errors)
  print(f'{cells} cell(s) classified' + (f' to {FLAGS.output}' if FLAGS.output else '')
        + (f'; {len(errors)} image(s) failed:' if errors else ''), file=sys.stderr)
  for r in errors:
    print(f'  {r["error"]}' if r['error'].startswith(r['image']) else
          f'  {r["image"]}: {r["error"]}', file=sys.stderr)
  sys.exit(1 if errors else 0)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
