"""Write a grid of images to a PNG file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
  """images [rows, cols, h, w, 3] in [0, 1] -> uint8 [H, W, 3] with white gaps."""
  images = np.asarray(images, np.float32)
  rows, cols, h, w, c = images.shape
  out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
  for r in range(rows):
    for k in range(cols):
      y, x = pad + r * (h + pad), pad + k * (w + pad)
      out[y:y + h, x:x + w] = images[r, k]
  return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image_grid(path: str | os.PathLike, images: np.ndarray) -> None:
  """Save images [rows, cols, h, w, 3] in [0, 1] as one PNG (written atomically)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp.png')
  Image.fromarray(image_grid(images)).save(tmp)
  os.replace(tmp, path)
