"""Finding the white blood cell on a whole smear: a small CenterNet-style network and a
classical colour baseline, both fitted on training images' WBC boxes only.

  net = fit_localiser(frames [N, H, W, 3] uint8, boxes [N][k, 4], config.localiser)
  found = detect(net, frames)                      -> list of Detections (boxes, scores)
  classical = fit_classical(frames, boxes)         -> ClassicalLocaliser (one fitted scale)
  found = classical.detect(frames)
  metrics = score_detections(found, boxes)         -> hit rate, centre error, none, several

Boxes are normalised (ymin, xmin, ymax, xmax) in [0, 1], as `bccd_wbc` stores them.

The network sees the frame downscaled to `config.localiser.input_hw` (120x160 by default: a
~200 px WBC becomes ~50 px) and predicts, on a grid 4x coarser (30x40), a centre heatmap, the
box's log size and the centre's offset inside its grid cell (Zhou et al. 2019, "Objects as
Points"). A detection is a local maximum of the heatmap (3x3) above `threshold`; the first is
the highest. On BCCD there is one WBC per image in almost every frame, so the most confident
detection is what frame classification uses; the others are reported (several cells).

The classical baseline is the violet nucleus of `wbc_jax.floor` on the downscaled frame: the
largest violet component's bounding box, centred on the component and scaled by one factor
(the median ratio of annotated box side to nucleus side on the training images), since the
annotated box holds the cytoplasm around the nucleus.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage as ndi

from wbc_jax import floor

Array = jax.Array

STRIDE = 4  # output grid cell, in pixels of the network's input


# ----------------------------------------------------------------------------- network


class _ConvBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
    x = nn.GroupNorm(num_groups=min(8, self.features // 4))(x)
    return nn.relu(x)


class CentreNet(nn.Module):
  """Frames [B, H, W, 3] in [0, 1] (H, W divisible by 8) -> heads [B, H/4, W/4, 5]:
  heatmap logit, log box height and width (in units of the input side / 4), centre offset
  (y, x) inside the grid cell in [0, 1].

  Stride-2 stem (H/2), stride-2 (H/4), a stride-2 context stage (H/8) upsampled back and
  added, so a grid cell sees a ~70 px receptive field of the input: a whole WBC at 120x160.
  About 90 k parameters.
  """

  width: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.width
    x = (x - 0.5) * 4.0  # smear colours around 0.5; a fixed scale keeps the stem simple
    x = _ConvBlock(w // 2, strides=2)(x)       # H/2
    x = _ConvBlock(w, strides=2)(x)            # H/4
    x = _ConvBlock(w)(x)
    c = _ConvBlock(2 * w, strides=2)(x)        # H/8: context
    c = _ConvBlock(2 * w)(c)
    c = _ConvBlock(2 * w)(c)
    b, h, wd, _ = x.shape
    c = jax.image.resize(c, (b, h, wd, c.shape[-1]), 'nearest')
    x = _ConvBlock(w)(jnp.concatenate([x, c], axis=-1))
    heat = nn.Conv(1, (1, 1), bias_init=nn.initializers.constant(-2.19))(x)  # prior 0.1
    size = nn.Conv(2, (1, 1))(x)
    offset = nn.Conv(2, (1, 1))(x)
    return jnp.concatenate([heat, size, offset], axis=-1)


# ----------------------------------------------------------------------------- data


def downscale(frames: np.ndarray, hw: Sequence[int]) -> np.ndarray:
  """uint8 frames [N, H, W, 3] -> float32 [N, h, w, 3] in [0, 1] (area averaging)."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'localiser: expected frames [N, H, W, 3], got shape {frames.shape}.')
  h, w = int(hw[0]), int(hw[1])
  if h % 8 or w % 8:
    raise ValueError(f'config.localiser.input_hw: {tuple(hw)}; both sides must be multiples of 8.')
  out = np.zeros((len(frames), h, w, 3), np.float32)
  for s in range(0, len(frames), 32):  # bounded memory: a float 480x640 frame is 3.7 MB
    chunk = jnp.asarray(frames[s:s + 32], jnp.float32) / 255.0
    out[s:s + 32] = jax.image.resize(chunk, (len(chunk), h, w, 3), 'linear', antialias=True)
  return out


def make_targets(boxes: Sequence[np.ndarray], grid_hw: tuple[int, int], min_sigma: float = 1.0
                 ) -> dict[str, np.ndarray]:
  """CenterNet targets on the output grid for normalised boxes [N][k, 4].

  heat [N, gh, gw]: a Gaussian at each box centre (sigma from the box's size, as CenterNet's
  radius rule, at least `min_sigma` cells), the maximum where they overlap; size [N, gh, gw, 2]
  log (height, width) in grid cells; offset [N, gh, gw, 2]; mask [N, gh, gw], 1 at centres.
  """
  gh, gw = grid_hw
  n = len(boxes)
  heat = np.zeros((n, gh, gw), np.float32)
  size = np.zeros((n, gh, gw, 2), np.float32)
  offset = np.zeros((n, gh, gw, 2), np.float32)
  mask = np.zeros((n, gh, gw), np.float32)
  yy, xx = np.mgrid[:gh, :gw].astype(np.float32)
  for i, bs in enumerate(boxes):
    for y0, x0, y1, x1 in np.reshape(bs, (-1, 4)):
      cy, cx = (y0 + y1) / 2 * gh, (x0 + x1) / 2 * gw
      bh, bw = max((y1 - y0) * gh, 1e-3), max((x1 - x0) * gw, 1e-3)
      iy, ix = min(int(cy), gh - 1), min(int(cx), gw - 1)
      sigma = max(min_sigma, min(bh, bw) / 6.0)
      g = np.exp(-((yy - iy) ** 2 + (xx - ix) ** 2) / (2 * sigma ** 2))
      heat[i] = np.maximum(heat[i], g)
      size[i, iy, ix] = np.log([bh, bw])
      offset[i, iy, ix] = (cy - iy, cx - ix)
      mask[i, iy, ix] = 1.0
  return {'heat': heat, 'size': size, 'offset': offset, 'mask': mask}


def flip_boxes(boxes: np.ndarray, vertical: bool, horizontal: bool) -> np.ndarray:
  b = np.array(np.reshape(boxes, (-1, 4)), np.float32)
  if vertical:
    b[:, [0, 2]] = 1.0 - b[:, [2, 0]]
  if horizontal:
    b[:, [1, 3]] = 1.0 - b[:, [3, 1]]
  return b


# ----------------------------------------------------------------------------- loss, step


def focal_loss(logits: Array, heat: Array, alpha: float = 2.0, beta: float = 4.0) -> Array:
  """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres.

  logits, heat: [B, gh, gw]; heat is 1 at centres and a Gaussian around them.
  """
  p = jax.nn.sigmoid(logits)
  log_p, log_1mp = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  centre = heat >= 1.0 - 1e-6
  pos = jnp.where(centre, (1 - p) ** alpha * log_p, 0.0)
  neg = jnp.where(centre, 0.0, (1 - heat) ** beta * p ** alpha * log_1mp)
  n = jnp.maximum(centre.sum(), 1.0)
  return -(pos.sum() + neg.sum()) / n


def loss_fn(params, net: CentreNet, images: Array, targets: dict) -> tuple[Array, dict]:
  out = net.apply({'params': params}, images)
  heat_loss = focal_loss(out[..., 0], targets['heat'])
  m = targets['mask'][..., None]
  n = jnp.maximum(targets['mask'].sum(), 1.0)
  size_loss = (jnp.abs(out[..., 1:3] - targets['size']) * m).sum() / n
  offset_loss = (jnp.abs(jax.nn.sigmoid(out[..., 3:5]) - targets['offset']) * m).sum() / n
  loss = heat_loss + size_loss + offset_loss
  return loss, {'heat': heat_loss, 'size': size_loss, 'offset': offset_loss}


@functools.lru_cache(maxsize=4)
def _programs(width: int, learning_rate: float, steps: int, weight_decay: float):
  net = CentreNet(width=width)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1),
                                                      steps), weight_decay=weight_decay)

  @jax.jit
  def step(params, opt_state, images, targets):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, net, images, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, parts

  return net, tx, step


@functools.lru_cache(maxsize=4)
def _forward(width: int):
  net = CentreNet(width=width)
  return jax.jit(lambda params, images: net.apply({'params': params}, images))


# ----------------------------------------------------------------------------- fitted localiser


@dataclasses.dataclass
class Localiser:
  """A fitted network: its parameters and what is needed to apply them."""
  params: dict
  input_hw: tuple[int, int]
  width: int
  threshold: float
  train_seconds: float = 0.0

  def save(self, directory: str) -> None:
    """Writes localiser.msgpack and localiser.json into `directory` (atomically each)."""
    os.makedirs(directory, exist_ok=True)
    meta = {'input_hw': list(self.input_hw), 'width': self.width, 'threshold': self.threshold,
            'train_seconds': self.train_seconds, 'stride': STRIDE}
    for name, data in (('localiser.msgpack', flax.serialization.msgpack_serialize(
        jax.tree.map(np.asarray, self.params))), ('localiser.json', json.dumps(meta, indent=1))):
      path = os.path.join(directory, name)
      mode = 'wb' if isinstance(data, bytes) else 'w'
      with open(path + '.tmp', mode) as f:
        f.write(data)
      os.replace(path + '.tmp', path)

  @classmethod
  def load(cls, directory: str) -> 'Localiser':
    paths = [os.path.join(directory, n) for n in ('localiser.json', 'localiser.msgpack')]
    for p in paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(f'{p}: no such file; expected a localiser written by '
                                'wbc_jax.localise.Localiser.save.')
    with open(paths[0]) as f:
      meta = json.load(f)
    with open(paths[1], 'rb') as f:
      params = flax.serialization.msgpack_restore(f.read())
    return cls(params=params, input_hw=tuple(meta['input_hw']), width=int(meta['width']),
               threshold=float(meta['threshold']), train_seconds=float(meta['train_seconds']))


def fit_localiser(frames: np.ndarray, boxes: Sequence[np.ndarray], cfg, *, seed: int = 0,
                  log: Callable[[str], None] = print) -> Localiser:
  """Trains the network on these frames and their WBC boxes (the training images only).

  cfg: `config.localiser` (input_hw, width, steps, batch_size, learning_rate, weight_decay,
  threshold). Augmentation: vertical and horizontal flips, brightness and contrast jitter.
  """
  if len(frames) != len(boxes):
    raise ValueError(f'localiser: {len(frames)} frames but {len(boxes)} box lists.')
  if len(frames) == 0:
    raise ValueError('localiser: no training frames.')
  start = time.perf_counter()
  hw = tuple(cfg.input_hw)
  images = downscale(frames, hw)
  grid = (hw[0] // STRIDE, hw[1] // STRIDE)
  net, tx, step = _programs(int(cfg.width), float(cfg.learning_rate), int(cfg.steps),
                               float(cfg.weight_decay))
  params = net.init(jax.random.key(seed), jnp.zeros((1, *hw, 3)))['params']
  opt_state = tx.init(params)
  rng = np.random.default_rng([seed, 1])
  n, bs = len(images), int(cfg.batch_size)
  report_every = max(int(cfg.steps) // 5, 1)
  for i in range(int(cfg.steps)):
    idx = rng.choice(n, size=bs, replace=n < bs)
    flips = rng.random((bs, 2)) < 0.5
    batch = images[idx].copy()
    bboxes = []
    for j, (v, h) in enumerate(flips):
      if v:
        batch[j] = batch[j, ::-1]
      if h:
        batch[j] = batch[j, :, ::-1]
      bboxes.append(flip_boxes(boxes[idx[j]], v, h))
    gain = rng.uniform(0.85, 1.15, (bs, 1, 1, 1)).astype(np.float32)
    bias = rng.uniform(-0.08, 0.08, (bs, 1, 1, 1)).astype(np.float32)
    mean = batch.mean(axis=(1, 2, 3), keepdims=True)
    batch = np.clip((batch - mean) * gain + mean + bias, 0.0, 1.0)
    params, opt_state, loss, parts = step(params, opt_state, batch, make_targets(bboxes, grid))
    if (i + 1) % report_every == 0 or i == 0:
      log(f'  localiser step {i + 1:4d}/{cfg.steps}  loss {float(loss):.3f} '
          f'(heat {float(parts["heat"]):.3f}, size {float(parts["size"]):.3f}, '
          f'offset {float(parts["offset"]):.3f})  {time.perf_counter() - start:.0f}s')
  return Localiser(params=jax.tree.map(np.asarray, params), input_hw=hw, width=int(cfg.width),
                   threshold=float(cfg.threshold), train_seconds=time.perf_counter() - start)


@dataclasses.dataclass
class Detections:
  """One frame's detections, most confident first: boxes [k, 4] normalised, scores [k]."""
  boxes: np.ndarray
  scores: np.ndarray


def decode(out: np.ndarray, threshold: float, max_detections: int = 8) -> list[Detections]:
  """Heads [B, gh, gw, 5] -> detections per frame: 3x3 local maxima of the heatmap at or
  above `threshold`; the single best peak is always returned (with its score), so that a
  caller can tell "nothing above threshold" (score < threshold) from "nothing at all"."""
  out = np.asarray(out, np.float32)
  b, gh, gw, _ = out.shape
  heat = 1.0 / (1.0 + np.exp(-out[..., 0]))
  peaks = heat == ndi.maximum_filter(heat, size=(1, 3, 3), mode='constant', cval=-1.0)
  result = []
  for i in range(b):
    ys, xs = np.nonzero(peaks[i])
    scores = heat[i, ys, xs]
    order = np.argsort(-scores, kind='stable')
    keep = [o for o in order if scores[o] >= threshold][:max_detections] or list(order[:1])
    boxes = []
    for o in keep:
      y, x = ys[o], xs[o]
      off = 1.0 / (1.0 + np.exp(-out[i, y, x, 3:5]))
      cy, cx = (y + off[0]) / gh, (x + off[1]) / gw
      bh, bw = np.exp(out[i, y, x, 1]) / gh, np.exp(out[i, y, x, 2]) / gw
      boxes.append([cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2])
    result.append(Detections(np.clip(np.array(boxes, np.float32), 0.0, 1.0),
                             np.asarray(scores[keep], np.float32)))
  return result


def detect(localiser: Localiser, frames: np.ndarray, batch_size: int = 32) -> list[Detections]:
  """uint8 frames [N, H, W, 3] (any size; boxes are relative to the frame) -> detections."""
  forward = _forward(localiser.width)
  found = []
  for s in range(0, len(frames), batch_size):
    images = downscale(frames[s:s + batch_size], localiser.input_hw)
    found += decode(forward(localiser.params, images), localiser.threshold)
  return found


# ----------------------------------------------------------------------------- classical


def nucleus_box(image: np.ndarray) -> tuple[np.ndarray, float] | None:
  """The largest violet component of a float [h, w, 3] image in [0, 1]: its bounding box
  (normalised) and its area fraction, or None when nothing is violet enough."""
  u8 = np.clip(image * 255.0, 0, 255).astype(np.uint8)
  v = ndi.uniform_filter(floor.violet(u8), size=3)
  t = max(floor.otsu_threshold(v), floor.MIN_VIOLET)
  mask = ndi.binary_opening(v > t, structure=np.ones((3, 3), bool))
  labels, n = ndi.label(mask)
  if n == 0:
    return None
  sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
  k = int(np.argmax(sizes)) + 1
  ys, xs = np.nonzero(labels == k)
  h, w = mask.shape
  box = np.array([ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w], np.float32)
  return box, float(sizes[k - 1]) / (h * w)


@dataclasses.dataclass
class ClassicalLocaliser:
  """The violet nucleus's bounding box, grown about its centre by `scale` (fitted)."""
  input_hw: tuple[int, int]
  scale: float

  def detect(self, frames: np.ndarray) -> list[Detections]:
    images = downscale(frames, self.input_hw)
    found = []
    for image in images:
      nb = nucleus_box(image)
      if nb is None:
        found.append(Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32)))
        continue
      (y0, x0, y1, x1), area = nb
      cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
      hh, hw_ = (y1 - y0) * self.scale / 2, (x1 - x0) * self.scale / 2
      box = np.clip(np.array([[cy - hh, cx - hw_, cy + hh, cx + hw_]], np.float32), 0.0, 1.0)
      found.append(Detections(box, np.array([area], np.float32)))
    return found


def fit_classical(frames: np.ndarray, boxes: Sequence[np.ndarray],
                  input_hw: Sequence[int] = (120, 160)) -> ClassicalLocaliser:
  """The one scale: the median ratio of annotated box side to nucleus-box side over the
  training frames whose nucleus box falls inside an annotated box."""
  images = downscale(frames, input_hw)
  ratios = []
  for image, bs in zip(images, boxes):
    nb = nucleus_box(image)
    if nb is None or len(np.reshape(bs, (-1, 4))) == 0:
      continue
    b = nb[0]
    ious = box_iou(b[None], np.reshape(bs, (-1, 4)))[0]
    true = np.reshape(bs, (-1, 4))[int(np.argmax(ious))]
    side = lambda x: np.sqrt((x[2] - x[0]) * (x[3] - x[1]))
    if side(b) > 0:
      ratios.append(side(true) / side(b))
  if not ratios:
    raise ValueError('classical localiser: no training frame with a violet nucleus.')
  return ClassicalLocaliser(tuple(int(v) for v in input_hw), float(np.median(ratios)))


# ----------------------------------------------------------------------------- scoring


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boxes a [n, 4] against b [m, 4] -> [n, m]."""
  a, b = np.reshape(a, (-1, 4))[:, None], np.reshape(b, (-1, 4))[None]
  ih = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  iw = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = ih * iw
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def score_detections(found: Sequence[Detections], boxes: Sequence[np.ndarray], threshold: float,
                     frame_hw: tuple[int, int] = (480, 640)) -> dict:
  """Per-frame outcomes and their summary, for frames with at least one annotated box.

  hit: the most confident detection above `threshold` has IoU >= 0.5 with an annotated box;
  centre error: pixels of the frame between its centre and the nearest annotated centre;
  none: no detection above threshold; several: two or more above threshold.
  """
  h, w = frame_hw
  rows = []
  for det, bs in zip(found, boxes):
    bs = np.reshape(bs, (-1, 4))
    if len(bs) == 0:
      continue
    above = det.scores >= threshold
    n_above = int(above.sum())
    if n_above == 0:
      rows.append({'hit': False, 'iou': 0.0, 'centre_px': float('nan'), 'found': 0})
      continue
    top = det.boxes[0]
    iou = float(box_iou(top[None], bs).max())
    c = np.array([(top[0] + top[2]) / 2 * h, (top[1] + top[3]) / 2 * w])
    cs = np.stack([(bs[:, 0] + bs[:, 2]) / 2 * h, (bs[:, 1] + bs[:, 3]) / 2 * w], axis=1)
    rows.append({'hit': iou >= 0.5, 'iou': iou,
                 'centre_px': float(np.min(np.hypot(*(cs - c).T))), 'found': n_above})
  n = len(rows)
  centre = np.array([r['centre_px'] for r in rows], np.float64)
  return {
      'frames': n,
      'hit_rate': float(np.mean([r['hit'] for r in rows])) if n else float('nan'),
      'mean_iou': float(np.mean([r['iou'] for r in rows])) if n else float('nan'),
      'median_centre_error_px': float(np.nanmedian(centre)) if np.isfinite(centre).any()
                                else float('nan'),
      'none_found': int(sum(r['found'] == 0 for r in rows)),
      'several_found': int(sum(r['found'] >= 2 for r in rows)),
      'rows': rows,
  }
