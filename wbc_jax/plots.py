"""Figures for reports: learning curves, confusion matrices, class counts, intervals, and
grids of images.

Each function writes one PNG and keeps no figure alive. Figures are built with
`matplotlib.figure.Figure`, which renders through the Agg canvas, rather than with `pyplot`:
there is no global figure registry to leak into, and nothing depends on a display or on the
backend a caller (or a notebook) has selected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay

_SPLIT_STYLES = {
    'train': dict(color='tab:blue', linestyle='-', label='train'),
    'val': dict(color='tab:orange', linestyle='-', label='val'),
    'test': dict(color='tab:green', linestyle='--', label='test (not used for selection)'),
}


def _new_figure(figsize) -> Figure:
  fig = Figure(figsize=figsize, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path) -> None:
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format='png', dpi=120)
  # Drops the canvas and artists now instead of waiting for the garbage collector.
  fig.clear()


def _per_seed_series(history: Sequence[Mapping], key: str):
  """Epochs where `key` was logged and its values as [epochs, seeds] (scalars become 1 seed)."""
  epochs, values = [], []
  for record in history:
    if key in record and record[key] is not None:
      epochs.append(record['epoch'])
      values.append(np.atleast_1d(np.asarray(record[key], dtype=np.float64)))
  if not epochs:
    return None, None
  return np.asarray(epochs), np.stack(values)


def plot_learning_curves(history: Sequence[Mapping], path, *, title: str) -> None:
  """Accuracy and loss against epoch, one line per split, mean over seeds with a min-max band.

  Args:
    history: one dict per evaluated epoch, e.g. {'epoch': 1, 'train_loss': [per-seed floats],
      'train_acc': [...], 'val_loss': [...], 'val_acc': [...]}; optional test_* keys are drawn
      dashed and labelled as not used for selection, so a reader does not mistake them for the
      curve that chose the checkpoint.
    path: output PNG.
    title: figure title.
  """
  fig = _new_figure((11, 4.2))
  ax_acc, ax_loss = fig.subplots(1, 2)
  for ax, metric, ylabel in ((ax_acc, 'acc', 'accuracy'), (ax_loss, 'loss', 'loss')):
    for split, style in _SPLIT_STYLES.items():
      epochs, values = _per_seed_series(history, f'{split}_{metric}')
      if epochs is None:
        continue
      ax.plot(epochs, values.mean(axis=1), marker='.', **style)
      if values.shape[1] > 1:
        ax.fill_between(epochs, values.min(axis=1), values.max(axis=1),
                        color=style['color'], alpha=0.2, linewidth=0)
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(f'{ylabel} (mean over seeds, band = min-max)')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.suptitle(title)
  _save(fig, path)


def plot_confusion_matrix(
    cm,
    class_names: Sequence[str],
    path,
    *,
    title: str,
    normalize: bool = True,
) -> None:
  """Confusion matrix with counts in every cell; rows = true class, columns = predicted.

  With `normalize`, the colour is the row-normalised rate (the recall of each true class), so
  that rare classes are as readable as common ones, and each cell shows its count and row
  percentage. Without it, colour and text are the raw counts.
  """
  counts = np.asarray(cm, dtype=np.int64)
  if counts.shape != (len(class_names), len(class_names)):
    raise ValueError(f'cm shape {counts.shape} does not match {len(class_names)} classes')
  fig = _new_figure((6.5, 5.5))
  ax = fig.subplots()
  if normalize:
    row_sums = counts.sum(axis=1, keepdims=True)
    # An absent true class gives an all-zero row rather than a division by zero.
    shown = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
  else:
    shown = counts
  display = ConfusionMatrixDisplay(shown, display_labels=list(class_names))
  display.plot(ax=ax, cmap='Blues', colorbar=True, values_format='.2f' if normalize else 'd',
               xticks_rotation=30)
  if normalize:
    display.im_.set_clim(0.0, 1.0)
    for (i, j), text in np.ndenumerate(display.text_):
      text.set_text(f'{counts[i, j]}\n{shown[i, j]:.0%}')
    display.im_.colorbar.set_label('fraction of true class')
  else:
    display.im_.colorbar.set_label('count')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title)
  _save(fig, path)


def plot_run(workdir, history: Sequence[Mapping], results: Mapping, class_names) -> None:
  """A classifier run's figures: WORKDIR/learning_curves.png and confusion_test.png (the seed
  ensemble's test confusion matrix, from results.json's contents)."""
  plot_learning_curves(history, os.path.join(workdir, 'learning_curves.png'),
                       title=f'{results["model"]} ({results["split"]})')
  cm = np.asarray(results['splits']['test']['ensemble']['confusion_matrix'])
  plot_confusion_matrix(cm, list(class_names), os.path.join(workdir, 'confusion_test.png'),
                        title=f'{results["model"]}: test, seed ensemble')


def plot_class_histogram(split_counts: Mapping[str, Mapping[str, int]], path, *,
                         title: str) -> None:
  """Grouped bars: per class, one bar per split, with the count written on each bar.

  Args:
    split_counts: {split: {class name: count}}; classes are shown in order of first appearance,
      and a class missing from a split counts as 0.
  """
  splits = list(split_counts)
  classes = list(dict.fromkeys(c for counts in split_counts.values() for c in counts))
  x = np.arange(len(classes))
  width = 0.8 / max(len(splits), 1)
  fig = _new_figure((max(6.0, 1.6 * len(classes) + 2), 4.5))
  ax = fig.subplots()
  for k, split in enumerate(splits):
    heights = [split_counts[split].get(c, 0) for c in classes]
    bars = ax.bar(x + (k - (len(splits) - 1) / 2) * width, heights, width, label=split)
    ax.bar_label(bars, fontsize=8)
  ax.set_xticks(x, classes)
  ax.set_xlabel('class')
  ax.set_ylabel('images')
  ax.set_title(title)
  ax.legend(title='split')
  ax.grid(axis='y', alpha=0.3)
  _save(fig, path)


def plot_intervals(labels: Sequence[str], points, lows, highs, baselines, path, *,
                   xlabel: str, title: str, interval_label: str, baseline_label: str) -> None:
  """Point chart of estimates with intervals, one row per label (the first at the top), each
  with a baseline marker; values in percent, on a 0-100 axis.

  Args:
    labels: the row names.
    points, lows, highs: [rows] estimates and interval ends.
    baselines: [rows] one reference value per row (e.g. the majority baseline).
  """
  fig = _new_figure((7.5, 0.45 * len(labels) + 1.6))
  ax = fig.subplots()
  y = np.arange(len(labels))[::-1]
  points, lows, highs = (np.asarray(v, np.float64) for v in (points, lows, highs))
  ax.errorbar(points, y, xerr=[points - lows, highs - points], fmt='o', color='tab:blue',
              capsize=3, label=interval_label)
  ax.scatter(baselines, y, marker='|', s=200, color='tab:red', label=baseline_label)
  ax.set_yticks(y, list(labels))
  ax.set_xlabel(xlabel)
  ax.set_xlim(-1, 101)  # room for a marker at 0 or 100
  ax.grid(axis='x', alpha=0.3)
  ax.legend(loc='lower right', fontsize=8)
  # A figure title, not an axes title: the long row labels push the axes right, and a title
  # centred on the axes ran off the figure's right edge.
  fig.suptitle(title)
  _save(fig, path)


def image_grid(images, pad: int = 2) -> np.ndarray:
  """images [rows, cols, h, w, 3] in [0, 1] -> uint8 [H, W, 3] with white gaps of `pad` px."""
  images = np.asarray(images, np.float32)
  rows, cols, h, w, c = images.shape
  out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
  for r in range(rows):
    for k in range(cols):
      y, x = pad + r * (h + pad), pad + k * (w + pad)
      out[y:y + h, x:x + w] = images[r, k]
  return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image_grid(images, path) -> None:
  """A grid of images at their own resolution, one pixel per pixel (GAN samples, real cells
  beside synthetic ones), written atomically.

  Args:
    images: [rows, cols, h, w, 3] floats in [0, 1] (clipped).
    path: output PNG.
  """
  images = np.asarray(images)
  if images.ndim != 5 or images.shape[-1] != 3:
    raise ValueError(f'expected images [rows, cols, h, w, 3], got {images.shape}')
  path = os.fspath(path)
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp = os.path.splitext(path)[0] + '.tmp.png'
  Image.fromarray(image_grid(images)).save(tmp)
  os.replace(tmp, path)
