"""TFDS builder `bccd_wbc`: BCCD smears labelled with their white-blood-cell type.

Sources (both public, MIT):
  * the BCCD detection archive (github.com/Shenggan/BCCD_Dataset, master):
    640x480 JPEG smears with Pascal VOC boxes for WBC, RBC and platelets;
  * the Kaggle "blood-cells" `labels.csv` (github.com/apple2373/BCCD): one row per
    image number with its WBC type(s).

One example per image that has exactly one known WBC type:
  image      uint8 [480, 640, 3]  the whole smear, the original JPEG bytes
  label      ClassLabel           EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL
                                  (config `with_basophil` adds BASOPHIL)
  wbc_boxes  BBox sequence        the WBC boxes of the VOC annotation (0, 1 or 2)
  image_id   int32                the NNNNN of BloodImage_NNNNN.jpg

Rows are skipped, and counted in the log, when the image is not in the archive,
the category is empty, the category names several types, or the type is not one
of the builder config's classes (BASOPHIL in the default config). Skipping rather
than failing is deliberate: the upstream labels file lists 411 numbers for 364
images and mixes multi-cell rows in, so a loader that fails on them cannot load it.

Offline use: put `BCCD_Dataset-master.zip` and `labels.csv` in a directory and pass
it as `download_config.manual_dir` (wbc_jax's config field `data.manual_dir`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import os
import re
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

ARCHIVE_NAME = 'BCCD_Dataset-master.zip'
LABELS_NAME = 'labels.csv'
ARCHIVE_URL = 'https://github.com/Shenggan/BCCD_Dataset/archive/refs/heads/master.zip'
LABELS_URL = 'https://raw.githubusercontent.com/apple2373/BCCD/master/labels.csv'
# The checksums of the copies the project was tested with. A different file is
# accepted (upstream archives get regenerated) but logged, since counts may change.
KNOWN_SHA256 = {
    ARCHIVE_NAME: '0b49e4c77e4493b0173b223954258137f8ab9a2ade37339eb209b240ae1ee969',
    LABELS_NAME: '2a11d215cade403d4fdb02b27b914c505bf59d4879b9b911fe97830b90c4e1a2',
}
CLASSES = ('EOSINOPHIL', 'LYMPHOCYTE', 'MONOCYTE', 'NEUTROPHIL')
ALL_TYPES = CLASSES + ('BASOPHIL',)
IMAGE_SHAPE = (480, 640, 3)
_IMAGE_RE = re.compile(r'BloodImage_(\d+)\.jpg$')


class BccdDataError(ValueError):
  """A source file of the BCCD data is missing, malformed or corrupt."""


@dataclasses.dataclass
class BccdWbcConfig(tfds.core.BuilderConfig):
  classes: tuple[str, ...] = CLASSES


def find_manual_files(manual_dir: str | os.PathLike) -> dict[str, str]:
  """Paths of the two source files in `manual_dir`, or a BccdDataError naming what is missing."""
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise BccdDataError(
        f'manual directory {manual_dir!r} does not exist; expected a directory holding '
        f'{ARCHIVE_NAME} and {LABELS_NAME} (see README, "Data").')
  paths = {name: os.path.join(manual_dir, name) for name in (ARCHIVE_NAME, LABELS_NAME)}
  missing = [name for name, path in paths.items() if not os.path.isfile(path)]
  if missing:
    raise BccdDataError(
        f'manual directory {manual_dir!r} lacks {", ".join(missing)}; expected both '
        f'{ARCHIVE_NAME} (from {ARCHIVE_URL}) and {LABELS_NAME} (from {LABELS_URL}).')
  return paths


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def read_labels(path: str) -> dict[int, str]:
  """`labels.csv` -> {image number: raw category string (may be empty or 'A, B')}."""
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.DictReader(f)
      fields = reader.fieldnames or []
      for column in ('Image', 'Category'):
        if column not in fields:
          raise BccdDataError(
              f'{path}: missing column {column!r}; expected a header with columns '
              f"'Image' and 'Category', got {fields}.")
      labels = {}
      for line, row in enumerate(reader, start=2):
        raw_id = (row['Image'] or '').strip()
        if not raw_id.isdigit():
          raise BccdDataError(
              f'{path}, line {line}: Image {raw_id!r} is not an image number.')
        labels[int(raw_id)] = (row['Category'] or '').strip()
  except UnicodeDecodeError as e:
    raise BccdDataError(f'{path}: not a UTF-8 CSV file ({e}).') from e
  return labels


def parse_wbc_boxes(xml_bytes: bytes, source: str) -> list[tuple[float, float, float, float]]:
  """WBC boxes of one VOC annotation as (ymin, xmin, ymax, xmax) in pixels."""
  try:
    root = ET.fromstring(xml_bytes)
  except ET.ParseError as e:
    raise BccdDataError(f'{source}: not a valid VOC XML annotation ({e}).') from e
  boxes = []
  for obj in root.iter('object'):
    if (obj.findtext('name') or '').strip() != 'WBC':
      continue
    bb = obj.find('bndbox')
    try:
      xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax'))
    except (AttributeError, TypeError, ValueError) as e:
      raise BccdDataError(f'{source}: a WBC object has no valid bndbox ({e}).') from e
    boxes.append((ymin, xmin, ymax, xmax))
  return boxes


def decode_jpeg_checked(data: bytes, source: str) -> np.ndarray:
  """Decodes a JPEG fully (so truncation is caught now, not mid-training)."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      array = np.asarray(img.convert('RGB'))
  except Exception as e:  # PIL raises several types for corrupt data.
    raise BccdDataError(f'{source}: corrupt or truncated JPEG ({type(e).__name__}: {e}).') from e
  if array.shape != IMAGE_SHAPE:
    raise BccdDataError(f'{source}: image shape {array.shape}, expected {IMAGE_SHAPE}.')
  return array


def iter_examples(archive_path: str, labels_path: str, classes=CLASSES, counts=None):
  """Yields (key, example dict) for each single-label image of `classes`.

  `counts` (a Counter) receives the number of rows kept and skipped by reason.
  """
  counts = collections.Counter() if counts is None else counts
  labels = read_labels(labels_path)
  try:
    archive = zipfile.ZipFile(archive_path)
  except (zipfile.BadZipFile, OSError) as e:
    raise BccdDataError(
        f'{archive_path}: not a readable zip archive ({e}); expected the BCCD '
        f'master archive from {ARCHIVE_URL}.') from e
  with archive:
    names = archive.namelist()
    jpegs, xmls = {}, {}
    for name in names:
      m = _IMAGE_RE.search(name)
      if m and '/JPEGImages/' in name:
        jpegs[int(m.group(1))] = name
      elif name.endswith('.xml') and '/Annotations/' in name:
        xmls[int(re.search(r'(\d+)\.xml$', name).group(1))] = name
    if not jpegs:
      raise BccdDataError(
          f'{archive_path}: no BCCD/JPEGImages/BloodImage_NNNNN.jpg inside; '
          'is it the BCCD archive?')
    for image_id in sorted(labels):
      category = labels[image_id]
      types = [t.strip() for t in category.split(',') if t.strip()]
      if image_id not in jpegs:
        counts['skipped: no image in archive'] += 1
        continue
      if not types:
        counts['skipped: empty category'] += 1
        continue
      if len(types) > 1:
        counts['skipped: several types'] += 1
        continue
      if types[0] not in classes:
        reason = 'not in config' if types[0] in ALL_TYPES else 'unknown type'
        counts[f'skipped: {types[0]} ({reason})'] += 1
        continue
      source = f'{archive_path}:{jpegs[image_id]}'
      try:
        data = archive.read(jpegs[image_id])
      except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise BccdDataError(f'{source}: cannot be read from the archive ({e}).') from e
      decode_jpeg_checked(data, source)
      boxes = []
      if image_id in xmls:
        boxes = parse_wbc_boxes(archive.read(xmls[image_id]), f'{archive_path}:{xmls[image_id]}')
      counts[f'kept: {types[0]}'] += 1
      counts[f'wbc boxes: {len(boxes)}'] += 1
      h, w = IMAGE_SHAPE[:2]
      yield image_id, {
          'image': data,
          'label': types[0],
          'wbc_boxes': [
              tfds.features.BBox(
                  ymin=min(max(y0 / h, 0.0), 1.0), xmin=min(max(x0 / w, 0.0), 1.0),
                  ymax=min(max(y1 / h, 0.0), 1.0), xmax=min(max(x1 / w, 0.0), 1.0))
              for y0, x0, y1, x1 in boxes
          ],
          'image_id': image_id,
      }
  logging.info('bccd_wbc: %s', dict(sorted(counts.items())))


class BccdWbc(tfds.core.GeneratorBasedBuilder):
  """BCCD smears with exactly one white-blood-cell type each."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      BccdWbcConfig(name='four_class', description='EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL.'),
      BccdWbcConfig(name='five_class', description='The four types plus BASOPHIL (3 images).',
                    classes=ALL_TYPES),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Place {ARCHIVE_NAME} ({ARCHIVE_URL}) and {LABELS_NAME} ({LABELS_URL}) in the '
      'manual directory (download_config.manual_dir). Without them the builder downloads both.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=IMAGE_SHAPE, encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=list(self.builder_config.classes)),
            'wbc_boxes': tfds.features.Sequence(tfds.features.BBoxFeature()),
            'image_id': np.int32,
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/Shenggan/BCCD_Dataset',
        citation='BCCD Dataset, https://github.com/Shenggan/BCCD_Dataset (MIT).',
    )

  def _source_paths(self, dl_manager) -> dict[str, str]:
    manual = dl_manager._manual_dir  # pylint: disable=protected-access
    if manual is not None and os.path.isdir(manual) and os.listdir(manual):
      return find_manual_files(manual)
    try:
      got = dl_manager.download({ARCHIVE_NAME: ARCHIVE_URL, LABELS_NAME: LABELS_URL})
    except Exception as e:  # network errors come in many types
      raise BccdDataError(
          f'could not download the BCCD sources ({type(e).__name__}: {e}). Offline, put '
          f'{ARCHIVE_NAME} and {LABELS_NAME} in a directory and pass it as manual_dir.') from e
    return {name: os.fspath(path) for name, path in got.items()}

  def _split_generators(self, dl_manager):
    paths = self._source_paths(dl_manager)
    for name, path in paths.items():
      digest = _sha256(path)
      if digest != KNOWN_SHA256[name]:
        logging.warning('bccd_wbc: %s has sha256 %s, not the tested %s; counts may differ.',
                        path, digest, KNOWN_SHA256[name])
    return {'train': self._generate_examples(paths[ARCHIVE_NAME], paths[LABELS_NAME])}

  def _generate_examples(self, archive_path, labels_path):
    counts = collections.Counter()
    yield from iter_examples(archive_path, labels_path, self.builder_config.classes, counts)
    print(f'bccd_wbc ({self.builder_config.name}): ' +
          ', '.join(f'{k}={v}' for k, v in sorted(counts.items())), flush=True)
