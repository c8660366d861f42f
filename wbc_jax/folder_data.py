"""Your own WBC collection: one folder per class, in place of BCCD, for the same configs.

  python -m wbc_jax.main --config=configs/baseline.py:quick --workdir=DIR \
      --config.data.name=folder --config.data.folder=/path/to/collection

  /path/to/collection/
    EOSINOPHIL/img001.jpg  img001.xml (optional: a Pascal VOC file with WBC boxes)  ...
    LYMPHOCYTE/...
    ...

The class names are the sub-folders' names, sorted (or `data.folder_classes`, which must then
match them exactly). Every image of a collection must have the same size (the frame view
resizes them together, the window crop counts pixels of the frame). An image with a VOC file
beside it is a smear whose WBC boxes are the file's 'WBC' objects; an image without one is
taken to be the cell itself (its box is the whole image), as in collections of cell crops.
Images are numbered in (class, file name) order: those numbers are the image ids of the
splits. Errors name the folder or file: a class folder with no images, an unreadable image,
a size that differs, classes other than `folder_classes`.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from wbc_jax import bccd_wbc

NAME = 'folder'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


class FolderDataError(ValueError):
  """A folder collection is not what `load` expects; the message names the path."""


def _read(path: str) -> np.ndarray:
  import tensorflow as tf
  try:
    with open(path, 'rb') as f:
      return tf.io.decode_image(f.read(), channels=3, expand_animations=False).numpy()
  except Exception as e:  # TensorFlow raises several types for corrupt data.
    raise FolderDataError(f'{path}: not a readable image ({type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""}).') from e


def _boxes(image_path: str, hw: tuple[int, int]) -> np.ndarray:
  xml = os.path.splitext(image_path)[0] + '.xml'
  if not os.path.isfile(xml):
    return np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
  with open(xml, 'rb') as f:
    boxes = bccd_wbc.parse_wbc_boxes(f.read(), xml)
  h, w = hw
  return np.clip(np.array([[y0 / h, x0 / w, y1 / h, x1 / w] for y0, x0, y1, x1 in boxes],
                          np.float32).reshape(-1, 4), 0.0, 1.0)


def load(folder: str, classes: tuple[str, ...] = ()) -> dict:
  """The collection as `input_pipeline.load_raw` returns BCCD: images [N, H, W, 3] uint8,
  labels, image_ids, boxes ([k, 4] normalised per image) and class_names."""
  return _load(os.path.abspath(folder), tuple(classes))


@functools.lru_cache(maxsize=4)
def _load(folder: str, classes: tuple[str, ...]) -> dict:
  if not os.path.isdir(folder):
    raise FolderDataError(f'config.data.folder={folder!r}: no such directory; expected one '
                          'sub-folder of images per class.')
  found = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))
                 and not n.startswith('.'))
  if len(found) < 2:
    raise FolderDataError(f'{folder}: {len(found)} class folder(s) ({", ".join(found) or "none"});'
                          ' expected one sub-folder of images per class, at least two.')
  if classes and tuple(sorted(classes)) != tuple(found):
    raise FolderDataError(f'{folder}: class folders {found} differ from config.data.'
                          f'folder_classes {list(classes)}.')
  class_names = tuple(classes) or tuple(found)
  images, labels, boxes, shape, first = [], [], [], None, None
  for label, name in enumerate(class_names):
    directory = os.path.join(folder, name)
    files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FolderDataError(f'{directory}: no images ({", ".join(IMAGE_EXTENSIONS)}); every '
                            'class needs at least one.')
    for f in files:
      path = os.path.join(directory, f)
      image = _read(path)
      if shape is None:
        shape, first = image.shape, path
      elif image.shape != shape:
        raise FolderDataError(f'{path}: {image.shape[0]}x{image.shape[1]} pixels, but {first} '
                              f'is {shape[0]}x{shape[1]}; every image of a collection must '
                              'have one size.')
      images.append(image)
      labels.append(label)
      boxes.append(_boxes(path, image.shape[:2]))
  return {'images': np.stack(images), 'labels': np.asarray(labels, np.int32),
          'image_ids': np.arange(len(images), dtype=np.int32), 'boxes': boxes,
          'class_names': class_names}
