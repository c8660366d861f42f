r"""The ablation: regimes x models x views x folds, each run training S seeds at once.

  python -m wbc_jax.main --config=configs/ablation.py --workdir=workdirs/ablation
  python -m wbc_jax.main --config=configs/ablation.py:quick --workdir=workdirs/quick
  python -m wbc_jax.main --config=configs/ablation.py:test --workdir=/tmp/wbc_test

Variants (the argument after the colon):
  (none)  the paper's ablation: four regimes x two models, its training (Adam, 50
          epochs, batch 32) on 5 stratified folds, 4 seeds, frame view. Many hours on a
          2-core CPU.
  quick   the same ablation shrunk for a 2-core CPU: holdout split, 2 seeds, 20 epochs
          of as many steps as the real training images fill, GAN 300 steps, both views
          (crops at 32 px), synthetic-data measures. Both GANs train the frame view at
          24x32 (gan.resolution_by_view; sampled, then resized to 60x80), crops at 32x32.
  study   the recorded study, crop view (experiments/study): 3-fold CV, 2 seeds,
          25 epochs, all four regimes (conditional GAN, 300 steps), 32 px crops.
  study_frame  the recorded study, frame view (experiments/study/frame): the same 3
          folds on 60x80 frames, where a step costs ~5x more: 1 seed, 20 epochs,
          conditional GAN 150 steps. Run it in its own work directory.
  test    seconds: the whole (small) dataset at 24x32, 2 epochs of 2 steps, 2 seeds.
          For the test suite.

Set the data location with --config.data.manual_dir=DIR (a directory holding
BCCD_Dataset-master.zip and labels.csv) or the environment variable
WBC_JAX_MANUAL_DIR; leave both empty to download.
"""

import os

import ml_collections

from wbc_jax import names
from wbc_jax.gan import models as gan_models

REGIMES = names.REGIME_NAMES


def gan_config(kind: str = 'cond') -> ml_collections.ConfigDict:
  """The GAN of the '+gan' regimes (`config.gan`), every field at its default for `kind`
  ('paper' or 'cond'); locked. The GAN library (wbc_jax.gan) reads these fields.

  Fields:
    kind: 'paper' (one unconditional DCGAN per class) or 'cond' (one
      class-conditional GAN).
    steps: optimizer steps (each one D update then one G update).
    batch_size: real images per step (and as many generated ones).
    lr_g, lr_d, b1, b2: Adam for the generator and the discriminator.
    loss_type: 'bce' (non-saturating) or 'hinge'; see ``losses``.
    diffaug_policy: DiffAugment policy, '' for none; see ``diffaug``.
    r1_gamma: weight gamma of the R1 penalty gamma/2 E||grad D(x_real)||^2; 0 off.
    ema_decay: decay of the generator's exponential moving average used for
      sampling; 0 samples from the raw generator.
    latent_dim: size of z.
    channels: base width of the 'cond' networks (ignored by 'paper').
    log_every, sample_every, checkpoint_every: cadences in steps; each also
      fires on the last step (0 for sampling: never; 0 for checkpoints: only
      at the end).
    samples_per_class: columns of the sample grids.
    conv_impl: 3x3 convolutions, 'auto' | 'xla' | 'matmul' | 'onednn' (wbc_jax.models.Conv3x3).
    resolution: (height, width) the GAN trains and samples at, each divisible by 4; ()
      (the default) is the classifier's input. Otherwise the real images are resized to it
      and the samples back to the classifier's input (bilinear, antialiased; see
      ``wbc_jax.gan.sample.resize_images``). The paper's GAN ran at 256x256; at 60x80 one of
      its steps costs ~480 GFLOP per class, so a smaller resolution is the way to afford it
      on a CPU.
    resolution_by_view: a view's own resolution, () = `resolution` (whose () is the
      classifier's input); e.g. --config.gan.resolution_by_view.frame='(24,32)'.
  """
  if kind not in gan_models.GAN_KINDS:
    raise ValueError(f'Unknown GAN kind {kind!r}; expected one of {gan_models.GAN_KINDS}')
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.batch_size = 32
  c.log_every = 100
  c.sample_every = 500
  c.checkpoint_every = 500
  c.samples_per_class = 8
  c.conv_impl = 'auto'  # 3x3 convolutions: see wbc_jax.models.Conv3x3
  c.resolution = ()     # () = the classifier's input size
  if kind == 'paper':
    c.steps = 4000
    c.lr_g = 1e-4
    c.lr_d = 1e-4
    # The study gives only the learning rate; b1 = 0.5 is the DCGAN setting
    # (Radford et al. 2016) that its Keras architecture comes from.
    c.b1 = 0.5
    c.b2 = 0.999
    c.loss_type = 'bce'
    c.diffaug_policy = ''
    c.r1_gamma = 0.0
    c.ema_decay = 0.0
    c.latent_dim = 100
    c.channels = 0
  else:
    c.steps = 5000
    c.lr_g = 2e-4
    c.lr_d = 2e-4
    c.b1 = 0.0
    c.b2 = 0.99
    c.loss_type = 'hinge'
    c.diffaug_policy = 'color,translation,cutout'
    c.r1_gamma = 0.0
    c.ema_decay = 0.999
    c.latent_dim = 128
    c.channels = 32
  c.resolution_by_view = ml_collections.ConfigDict({'frame': (), 'crop': ()})
  c.lock()
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: '[full|quick|study|study_frame|test][,paper_gan]', e.g. 'quick,paper_gan'."""
  names = ('full', 'quick', 'study', 'study_frame', 'test')
  tokens = [t for t in (arg or '').split(',') if t]
  variants = [t for t in tokens if t in names]
  unknown = [t for t in tokens if t not in names + ('paper_gan',)]
  if unknown or len(variants) > 1:
    raise ValueError(f"configs/ablation.py: bad argument {arg!r}; expected one of '', 'quick', "
                     "'study', 'study_frame', 'test', optionally followed by ',paper_gan'.")
  variant = variants[0] if variants else 'full'
  gan_kind = 'paper' if 'paper_gan' in tokens else 'cond'
  c = ml_collections.ConfigDict()
  c.seed = 0                  # seeds are seed, seed+1, ..., seed+num_seeds-1
  c.num_seeds = 4

  c.data = ml_collections.ConfigDict()
  c.data.name = 'bccd_wbc/four_class'
  c.data.data_dir = ''        # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
  # name='folder': your own collection, one sub-folder of images per class (wbc_jax.folder_data)
  c.data.folder = ''
  c.data.folder_classes = ()  # () = the sub-folders' names, sorted
  c.data.manual_dir = os.environ.get('WBC_JAX_MANUAL_DIR', '')
  c.data.view = 'frame'       # set per run from `views`
  c.data.frame_size = (60, 80)
  c.data.crop_size = 64
  c.data.crop_margin = 0.25
  c.data.crop_mode = 'box'    # 'box': crop_margin around each box | 'window': window_px square
  c.data.window_px = 288      # the window's side in pixels of the 640x480 frame

  c.split = ml_collections.ConfigDict()
  # 'holdout' | 'kfold' | 'paper': the published study's LEAKY pipeline, whose GAN regimes
  # split a pool of real and synthetic images (see wbc_jax.ablation.paper_pool); its other
  # regimes use the holdout split.
  c.split.protocol = 'kfold'
  c.split.split_seed = 0
  c.split.test_fraction = 0.15
  c.split.val_fraction = 0.15
  c.split.folds = 5
  c.split.repeats = 1
  c.split.max_splits = -1     # run only the first n splits (-1: all)

  # Traditional augmentation, used by the '+trad' regimes only. The paper's: rotation
  # within 10 degrees and horizontal flips; the others are extras, off by default.
  c.augment = ml_collections.ConfigDict()
  c.augment.hflip = True
  c.augment.vflip = False
  c.augment.rot90 = False
  c.augment.rotation_deg = 10.0
  c.augment.color_jitter = 0.0
  # 'tfdata': per image in the input pipeline (the fields above); 'jax': on the batch inside
  # the jitted train step (wbc_jax.augment), which also has the fields below.
  c.augment.impl = 'tfdata'
  c.augment.scale = 0.0       # zoom within [1 / (1 + scale), 1 + scale]
  c.augment.shift = 0.0       # translation within +-shift of the image size
  c.augment.brightness = 0.0  # these four override color_jitter's share when > 0
  c.augment.contrast = 0.0
  c.augment.saturation = 0.0
  c.augment.hue = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 50
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.optimizer = 'adam'  # 'adam' | 'adamw' | 'sgd'
  c.train.learning_rate = 1e-3  # Keras Adam default, as the paper
  c.train.weight_decay = 0.0
  c.train.schedule = 'constant'  # 'constant' | 'warmup_cosine'
  c.train.warmup_steps = 0
  c.train.final_lr_fraction = 0.0  # the cosine's end, as a fraction of the peak
  c.train.steps_per_epoch = -1  # > 0: fixed-length epochs (evaluation periods) of this many steps
  c.train.max_steps_per_epoch = -1  # > 0: truncate epochs (tests only); -1: whole epochs
  c.train.sampling = 'uniform'  # 'uniform' | 'balanced' (each class equally often) | 'sqrt'
  c.train.label_smoothing = 0.0
  c.train.logit_adjust_tau = 0.0  # > 0: logit-adjusted loss (Menon et al., 2021)
  c.train.ema_decay = 0.0     # > 0: evaluate a moving average of the weights
  c.train.prior_correction = 0.0  # tau > 0: predictions times (training prior) ** tau
  c.train.fit_on = 'train'    # 'train' | 'train+val' (refit on both; needs select='last')
  c.train.standardize = False  # per-channel standardisation with training-image statistics
  # Which epoch's parameters are tested: 'val_accuracy' (the paper's), 'val_balanced_accuracy',
  # 'val_loss', or 'last' (the end of a fixed schedule).
  c.train.select = 'val_accuracy'
  c.train.tta = False         # evaluate the mean over the 8 flips/rotations (square images)
  # With tta: False evaluates the per-epoch curves without it (8x cheaper); the final
  # evaluation always uses it. Selection rules on validation then see the plain model.
  c.train.curve_tta = True
  c.train.class_weighting = False  # weight the loss by inverse class frequency
  c.train.conv_impl = 'auto'  # 'auto' | 'xla' | 'matmul' | 'onednn' (see wbc_jax.models.Conv3x3)
  c.train.checkpoint_every_epochs = 5
  c.train.log_test_every_epoch = True  # for curves only; selection never looks at test
  c.train.eval_train_every_epoch = True  # train-image curves (costly at 60x80)
  # Steps per epoch: 'all' = one pass over real + synthetic training images (the paper's);
  # 'real' = one pass's worth of the real images, drawn from the whole pool, so every regime
  # gets the same number of updates.
  c.train.steps_per_epoch_basis = 'all'

  # The device mesh (wbc_jax.sharding): the seeds are spread over `seed`, each seed's batch
  # over `data`; -1 takes the remaining devices (of all processes). num_seeds must be a
  # multiple of the seed size and train.batch_size of the data size.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.seed = -1
  c.mesh.data = 1

  # The GAN of the '+gan' regimes, trained inside each training split only (never on
  # validation or test images), then sampled to top every class up to the target.
  c.gan = gan_config(gan_kind)
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.target_per_class = 300  # the paper's
  c.synthetic.gan_seed = 0            # one GAN per split, shared by the classifier seeds
  # After the runs, measure each split's synthetic images (KID, FID, CAS, memorisation;
  # wbc_jax.measures) in the feature space of that split's 'original' CNN.
  c.synthetic.measures = False

  # The WBC localiser (wbc_jax.localise): a small CenterNet-style network on the frame
  # downscaled to input_hw, fitted on the training images' WBC boxes only.
  c.localiser = ml_collections.ConfigDict()
  c.localiser.input_hw = (120, 160)   # a ~200 px WBC of the 480x640 frame becomes ~50 px
  c.localiser.width = 32
  c.localiser.steps = 400
  c.localiser.batch_size = 16
  c.localiser.learning_rate = 3e-3
  c.localiser.weight_decay = 1e-4
  c.localiser.threshold = 0.3         # heatmap peak score that counts as a found cell

  c.report = ml_collections.ConfigDict()
  c.report.n_boot = 2000        # bootstrap resamples per interval of REPORT.md

  c.ablation = ml_collections.ConfigDict()
  c.ablation.regimes = REGIMES
  c.ablation.models = ('cnn', 'cnn_rnn')
  c.ablation.views = ('frame',)

  if variant == 'quick':
    # Small enough for one sitting of a 2-core CPU, large enough to learn something: 42
    # updates per seed (the earlier 6 epochs) left every paper model at the majority class
    # (experiments/quick_ablation); the study's 150 did not.
    c.num_seeds = 2
    c.split.protocol = 'holdout'
    c.data.crop_size = 32
    c.train.epochs = 20
    c.train.steps_per_epoch_basis = 'real'
    c.train.checkpoint_every_epochs = 5
    c.train.eval_train_every_epoch = False
    c.ablation.views = ('frame', 'crop')
    c.synthetic.measures = True
    c.gan.steps = 300
    c.gan.log_every = 50
    c.gan.sample_every = 100
    c.gan.checkpoint_every = 100
    # The paper's GAN at the 60x80 frame costs ~480 GFLOP per class and step (about
    # 40 s for the four classes on 2 cores, 300 steps over 3 h); at 24x32, the frame's
    # aspect with 6.25x fewer pixels, a sitting affords it. The conditional GAN trains
    # at the same 24x32, so the two GANs are compared at one resolution. Crops keep 32x32.
    c.gan.resolution_by_view.frame = (24, 32)
  elif variant in ('study', 'study_frame'):
    # The recorded study on a 2-core CPU. Every regime gets the same number of updates
    # ('real' basis); per-epoch curves only on validation; the synthetic images of every
    # split are measured (KID, FID, CAS, memorisation) after its runs.
    c.split.folds = 3
    c.data.crop_size = 32
    c.train.steps_per_epoch_basis = 'real'
    c.train.eval_train_every_epoch = False
    c.train.log_test_every_epoch = False
    c.ablation.regimes = REGIMES
    c.synthetic.measures = True
    c.gan.log_every = 50
    c.gan.sample_every = 100
    c.gan.checkpoint_every = 100
    if variant == 'study':
      c.num_seeds = 2
      c.train.epochs = 25
      c.ablation.views = ('crop',)
      c.gan.steps = 300
    else:
      # A 60x80 training step of the paper's CNN costs ~5x a 32 px one: one seed and
      # fewer updates keep the frame view inside one sitting of this CPU.
      c.num_seeds = 1
      c.train.epochs = 20
      c.ablation.views = ('frame',)
      c.gan.steps = 150
  elif variant == 'test':
    c.ablation.regimes = ('original', 'original+trad')  # tests that need GANs add them
    c.num_seeds = 2
    c.split.protocol = 'holdout'
    c.train.epochs = 2
    c.train.batch_size = 8
    c.train.max_steps_per_epoch = 2
    c.train.eval_batch_size = 128
    c.train.checkpoint_every_epochs = 1
    # Small images keep the suite fast; the models' pinned parameter counts at 60x80
    # are tested separately.
    c.data.frame_size = (24, 32)
    c.data.crop_size = 24
    c.gan.steps = 2
    c.gan.batch_size = 4
    c.gan.log_every = 1
    c.gan.sample_every = 2
    c.gan.checkpoint_every = 2
    c.gan.channels = 8 if gan_kind == 'cond' else 0
    c.synthetic.target_per_class = 40
    c.report.n_boot = 100         # a report's shape, not its intervals, is what tests check
    c.localiser.input_hw = (48, 64)
    c.localiser.width = 8
    c.localiser.steps = 3
    c.localiser.batch_size = 4
  c.lock()
  return c
