r"""A look at the data: examples per class in both views, augmented copies, split histograms.

  python scripts/show_data.py --out=workdirs/data_look [--manual_dir=../shared/bccd]

Writes data_look.png (real cells: keep it in a work directory, never commit it) and
class_histograms.png (counts only). Boxes are drawn on the frames so one can check that
they sit on the WBC.
"""

from wbc_jax import crops
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string('out', 'workdirs/data_look', 'Output directory.')
flags.DEFINE_string('manual_dir', os.environ.get('WBC_JAX_MANUAL_DIR', ''), 'BCCD files.')
flags.DEFINE_string('data_dir', '', 'TFDS data_dir.')
flags.DEFINE_integer('per_class', 4, 'Examples shown per class.')
FLAGS = flags.FLAGS


def main(_):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  from configs import ablation
  from wbc_jax import input_pipeline as ip
  from wbc_jax import plots

  config = ablation.get_config()
  with config.unlocked():
    config.data.manual_dir = FLAGS.manual_dir
    config.data.data_dir = FLAGS.data_dir
  raw = ip.load_raw(config.data)
  views = {}
  for view in ip.VIEWS:
    dc = config.data.copy_and_resolve_references()
    with dc.unlocked():
      dc.view = view
    views[view] = ip.make_view(raw, dc)
  names = raw['class_names']
  k = FLAGS.per_class
  cols = 4 * k  # per class: frame with boxes, frame view, crop view, augmented crop
  fig, axes = plt.subplots(len(names), cols, figsize=(cols * 1.6, len(names) * 1.7))
  aug = config.augment.copy_and_resolve_references()
  with aug.unlocked():
    aug.rotation_deg, aug.hflip = 10.0, True
  for c, name in enumerate(names):
    idx = np.flatnonzero(raw['labels'] == c)[:k]
    crops_aug = ip.train_batches(views['crop'].images[idx], views['crop'].labels[idx], seeds=[0],
                                 epoch=0, batch_size=len(idx), aug=aug, augment=True)[0]
    order = ip.epoch_indices(len(idx), len(idx), 0, 0)[0]
    inverse = np.argsort(order)
    for j, i in enumerate(idx):
      panels = [raw['images'][i], views['frame'].images[i], views['crop'].images[i],
                crops_aug['image'][0][inverse[j]]]
      titles = [f'{name[:4]} #{raw["image_ids"][i]}', 'frame 60x80', 'crop', 'crop + trad aug']
      for p, (img, title) in enumerate(zip(panels, titles)):
        ax = axes[c, 4 * j + p]
        ax.imshow(img)
        ax.set_title(title, fontsize=6)
        ax.axis('off')
        if p == 0:
          h, w = img.shape[:2]
          for y0, x0, y1, x1 in raw['boxes'][i]:
            ax.add_patch(plt.Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h,
                                       fill=False, color='lime', lw=1))
          y0, x0, y1, x1 = crops.crop_box(raw['boxes'][i], config.data.crop_margin, (h, w))
          ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color='yellow',
                                     lw=0.8, ls='--'))
  fig.suptitle('BCCD WBC types: frame with WBC box (green) and crop (yellow), the two views, '
               'an augmented crop', fontsize=8)
  fig.tight_layout()
  os.makedirs(FLAGS.out, exist_ok=True)
  fig.savefig(os.path.join(FLAGS.out, 'data_look.png'), dpi=130)
  plt.close(fig)

  counts = {}
  for protocol in ('holdout', 'kfold'):
    sc = config.split.copy_and_resolve_references()
    with sc.unlocked():
      sc.protocol = protocol
    s = ip.make_splits(raw['labels'], sc)[0]
    for part in ('train', 'val', 'test'):
      counts[f'{protocol} {s.name} {part}'] = ip.class_counts(raw['labels'][getattr(s, part)], names)
  plots.plot_class_histogram(counts, os.path.join(FLAGS.out, 'class_histograms.png'),
                             title='Images per class in each split (holdout; first k-fold split)')
  for key, value in counts.items():
    print(f'{key:22s} {value}')
  print(f'wrote {FLAGS.out}/data_look.png and class_histograms.png')


if __name__ == '__main__':
  app.run(main)
