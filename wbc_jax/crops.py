"""Cutting the white blood cell out of a frame, around a box (`input_pipeline`'s crop views).

Boxes are normalised (ymin, xmin, ymax, xmax) in [0, 1], a [k, 4] array per frame; the largest
of a frame's boxes is used. Two modes (`config.data.crop_mode`):
  box     a square `crop_margin` wider than the box's longer side, shifted inside the frame;
  window  a fixed `window_px` square of the frame centred on the box, mirrored past its edge.
Both are resized to `crop_size` (area averaging).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

CROP_MODES = ('box', 'window')
FALLBACK_CROP_PX = 240


def crop_box(boxes: np.ndarray, margin: float, frame_hw=(480, 640)) -> np.ndarray:
  """The square crop (y0, x0, y1, x1), in pixels, for one image's WBC boxes [k, 4]."""
  h, w = frame_hw
  if len(boxes) == 0:
    side = FALLBACK_CROP_PX
    cy, cx = h / 2, w / 2
  else:
    b = boxes * np.array([h, w, h, w], np.float64)
    largest = b[np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))]
    cy, cx = (largest[0] + largest[2]) / 2, (largest[1] + largest[3]) / 2
    side = max(largest[2] - largest[0], largest[3] - largest[1]) * (1 + margin)
  side = min(side, h, w)
  # Shift the square inside the frame instead of padding: padding would teach the
  # classifier that black borders mean "cell near the edge".
  y0 = float(np.clip(cy - side / 2, 0, h - side))
  x0 = float(np.clip(cx - side / 2, 0, w - side))
  return np.array([y0, x0, y0 + side, x0 + side])


def window_box(boxes: np.ndarray, window_px: int, frame_hw=(480, 640)) -> np.ndarray:
  """The fixed window (y0, x0, y1, x1), integer pixels, centred on the largest WBC box [k, 4]
  (normalised); it may extend past the frame. No box: centred on the frame."""
  h, w = frame_hw
  if len(boxes) == 0:
    cy, cx = h / 2, w / 2
  else:
    b = boxes * np.array([h, w, h, w], np.float64)
    largest = b[np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))]
    cy, cx = (largest[0] + largest[2]) / 2, (largest[1] + largest[3]) / 2
  y0, x0 = int(round(cy - window_px / 2)), int(round(cx - window_px / 2))
  return np.array([y0, x0, y0 + window_px, x0 + window_px])


def window_crops(frames: np.ndarray, boxes, window_px: int) -> np.ndarray:
  """uint8 [N, window_px, window_px, 3]: each frame's window, mirrored past the frame edge."""
  if window_px < 8:
    raise ValueError(f'config.data.window_px must be at least 8 pixels, got {window_px}.')
  h, w = frames.shape[1:3]
  out = np.empty((len(frames), window_px, window_px, 3), np.uint8)
  for i, (frame, b) in enumerate(zip(frames, boxes)):
    y0, x0, y1, x1 = window_box(b, window_px, (h, w))
    pad = ((max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w)), (0, 0))
    # 'symmetric' repeats the edge row once; a frame edge is no feature of the cell either way.
    part = frame[max(0, y0):min(h, y1), max(0, x0):min(w, x1)]
    out[i] = np.pad(part, pad, mode='symmetric') if any(p for p in pad[:2] for p in p) else part
  return out


def check_crop_mode(data_config) -> str:
  mode = data_config.crop_mode
  if mode not in CROP_MODES:
    raise ValueError(f"config.data.crop_mode: unknown mode {mode!r}; expected one of "
                     f"{', '.join(CROP_MODES)}.")
  return mode


def crop_cells(frames: np.ndarray, boxes, data_config) -> np.ndarray:
  """uint8 [N, size, size, 3]: the cell crop of each frame [N, H, W, 3] around its boxes
  (a [k, 4] normalised array per frame; the largest is used), by `data_config.crop_mode`."""
  size = (data_config.crop_size, data_config.crop_size)
  if check_crop_mode(data_config) == 'window':
    out = tf.image.resize(window_crops(frames, boxes, data_config.window_px), size,
                          method='area')
  else:
    h, w = frames.shape[1:3]
    crops = np.stack([crop_box(b, data_config.crop_margin, (h, w)) for b in boxes])
    norm = crops / np.array([h, w, h, w])
    # crop_and_resize samples bilinearly; crops are 3-4x larger than the output, so
    # crop at 4x first and area-average down to avoid aliasing.
    big = tf.image.crop_and_resize(frames, norm.astype(np.float32),
                                   tf.range(len(frames)), [4 * size[0], 4 * size[1]])
    out = tf.image.resize(big, size, method='area')
  return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)
