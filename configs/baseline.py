r"""The strong crop baseline: a classifier that knows the cell types, before any augmentation
regime is judged on top of it.

  python -m wbc_jax.main --config=configs/baseline.py:quick --workdir=workdirs/baseline_quick
  python -m wbc_jax.main --config=configs/baseline.py:cv --workdir=workdirs/baseline_cv
  python -m wbc_jax.predict --workdir=workdirs/baseline_quick/crop/holdout/original_trad/cellnet \
      IMAGE.jpg

The recipe (every part a config field, the rest as `configs/ablation.py`):
  view     the per-box crop (`data.crop_mode='box'`): a square 25% wider than the WBC box's
           longer side, resized to 64 px (a ~200 px cell at ~4x downscaling). A fixed
           288-pixel window centred on the box (`crop_mode='window'`, ',window' below) keeps
           the cell's absolute size instead (lymphocytes small, monocytes large); it lost to
           the per-box crop on validation (experiments/baseline/removal.md);
  input    standardised per channel with the training images' statistics;
  model    `cellnet`, a 308 k-parameter ResNet with a stride-2 stem (wbc_jax.models);
  augment  in the jitted step (wbc_jax.augment): the 8 flips/rotations by 90 degrees, any
           rotation, scale within 10%, shift within 5%, brightness/contrast/saturation
           and a small hue jitter;
  balance  class-balanced sampling (each class a quarter of every batch on average) and
           label smoothing 0.1;
  optimise AdamW (weight decay 0.05), 2e-3 peak, warm-up then cosine decay, 800 updates of
           batch 32 per seed, with a moving average of the weights (decay 0.99);
  select   'last': the fixed schedule's end, with the averaged weights, evaluated with
           test-time augmentation (mean over the 8 flips/rotations) and the seed ensemble;
           the per-epoch validation curves use one view (`train.curve_tta=False`), 8x cheaper;
  prior    the probabilities times (training prior) ** 0.25 (`train.prior_correction`),
           chosen on validation images (experiments/baseline/prior.md): balanced sampling
           makes the model predict as if every class were equally common;
  refit    every choice above was made on validation; the recorded runs then train on the
           training and validation images together (`train.fit_on='train+val'`), so the
           validation curves of those runs are on images they trained on.
The regime is 'original+trad' (real images + this augmentation) and the run directories keep
the layout WORKDIR/crop/<split>/original_trad/cellnet/.

Variants:
  cv     the recorded experiment (experiments/baseline): stratified 5-fold cross-validation
         repeated twice, 2 seeds. 27 minutes on a 2-core CPU. Add ',located' for the
         located view too (about 2 minutes more per split).
  quick  one holdout split, the same recipe, with the located view: its localiser is stored
         with the run, so `wbc_jax.predict` classifies frames with no annotation.
  test   seconds, for the test suite.
  Add ',paper_models' for the paper's CNN and CNN-RNN with the same recipe (their
  full-resolution convolutions cost ~20x a cellnet step: hours), ',window' for the 288-pixel
  window instead of the per-box crop (',box', the default, is accepted too).
"""

import importlib.util
import os

import ml_collections


def _ablation_config(variant: str) -> ml_collections.ConfigDict:
  # The ablation config owns every default; this file changes only the recipe.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ablation.py')
  spec = importlib.util.spec_from_file_location('wbc_jax_configs_ablation', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: 'quick' | 'cv' | 'test', optionally followed by ',paper_models', ',window' and/or
  ',located'."""
  names = ('quick', 'cv', 'test')
  options = ('paper_models', 'box', 'window', 'located')
  tokens = [t for t in (arg or 'quick').split(',') if t]
  variants = [t for t in tokens if t in names]
  unknown = [t for t in tokens if t not in names + options]
  if unknown or len(variants) != 1:
    raise ValueError(f"configs/baseline.py: bad argument {arg!r}; expected one of "
                     f"{', '.join(names)}, optionally followed by ',paper_models', ',window' "
                     "(or ',box', the default) and/or ',located'.")
  variant = variants[0]
  c = _ablation_config('test' if variant == 'test' else '')
  with c.unlocked():
    c.num_seeds = 2
    c.data.view = 'crop'
    if 'box' in tokens and 'window' in tokens:
      raise ValueError(f"configs/baseline.py: bad argument {arg!r}; ',box' and ',window' "
                       "are two crop modes, give one.")
    c.data.crop_mode = 'window' if 'window' in tokens else 'box'
    # Used by crop_mode='window' only.
    c.data.window_px = 288
    c.data.crop_size = 64

    c.split.protocol = 'kfold' if variant == 'cv' else 'holdout'
    c.split.folds = 5
    c.split.repeats = 2

    c.augment.impl = 'jax'
    c.augment.hflip = True
    c.augment.vflip = True
    c.augment.rot90 = True
    c.augment.rotation_deg = 180.0
    c.augment.scale = 0.1
    c.augment.shift = 0.05
    c.augment.brightness = 0.1
    c.augment.contrast = 0.15
    c.augment.saturation = 0.15
    c.augment.hue = 0.02

    c.train.batch_size = 32
    c.train.optimizer = 'adamw'
    c.train.learning_rate = 2e-3
    c.train.weight_decay = 0.05
    c.train.schedule = 'warmup_cosine'
    c.train.warmup_steps = 100
    c.train.epochs = 16
    c.train.steps_per_epoch = 50      # an 'epoch' is an evaluation period of 50 updates
    c.train.sampling = 'balanced'
    c.train.label_smoothing = 0.1
    c.train.ema_decay = 0.99
    c.train.standardize = True
    c.train.select = 'last'
    c.train.prior_correction = 0.25
    c.train.fit_on = 'train+val'
    c.train.tta = True
    c.train.curve_tta = False       # per-epoch curves on one view: 8x cheaper
    c.train.checkpoint_every_epochs = 4
    c.train.eval_train_every_epoch = False
    c.train.log_test_every_epoch = False  # curves on validation; selection never sees test

    c.ablation.regimes = ('original+trad',)
    # The non-deep floor (wbc_jax.floor) trains on the same splits in seconds: every deep
    # number of the report stands beside it.
    c.ablation.models = ('cnn', 'cnn_rnn') if 'paper_models' in tokens else ('cellnet', 'floor')
    # 'located': the same classifiers on crops where the localiser (fitted on each split's
    # training boxes) found the cell, from whole frames (wbc_jax.located); ~3 min a split.
    located = variant != 'cv' or 'located' in tokens
    c.ablation.views = ('crop', 'located') if located else ('crop',)
    c.synthetic.measures = False
    if variant == 'test':
      c.data.crop_size = 24
      c.data.window_px = 96
      c.train.epochs = 2
      c.train.steps_per_epoch = 2
      c.train.warmup_steps = 1
      c.train.batch_size = 8
      c.train.checkpoint_every_epochs = 1
  c.lock()
  return c
