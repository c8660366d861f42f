"""Tests of wbc_jax.gan: networks, losses, DiffAugment, train step, run loop.

Everything is tiny (16x16 images, batches of 4, 2-4 steps); the file runs in
1-2 minutes on two CPU cores, nearly all of it XLA compilation. Tests that
train share one image set of fixed shape, so that they reuse compiled programs.
"""

import collections
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_sections
from configs import ablation as ablation_config
from wbc_jax import ablation
from wbc_jax.gan import data, diffaug, losses, models, sample, train

H, W = 16, 16
NUM_CLASSES = 2


def tiny_config(kind, **overrides):
  config = config_sections.gan(kind)
  config.unlock()
  config.update(batch_size=4, steps=2, log_every=1, sample_every=0, checkpoint_every=0,
                samples_per_class=2)
  if kind == 'cond':
    config.channels = 8
  config.update(overrides)
  config.lock()
  return config


def tiny_data():
  """8 images in [0, 1]; class 0 has 3, class 1 has 5."""
  rng = np.random.default_rng(0)
  images = rng.uniform(0.05, 1.0, size=(8, H, W, 3)).astype(np.float32)
  labels = np.array([0, 1, 0, 1, 1, 0, 1, 1], np.int32)
  return images, labels


def leaves_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def count_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Networks


def _make_pair(kind, height, width):
  if kind == 'paper':
    return models.PaperGenerator(height, width), models.PaperDiscriminator(), 100
  return (models.CondGenerator(height, width, NUM_CLASSES, channels=8),
          models.CondDiscriminator(NUM_CLASSES, channels=8), 128)


@pytest.mark.parametrize('kind', ['paper', 'cond'])
@pytest.mark.parametrize('height,width', [(16, 16), (24, 32), (60, 80), (64, 64), (96, 96)])
def test_network_output_shapes(kind, height, width):
  # Shapes only (abstract evaluation, nothing compiled), so the working
  # sizes cost nothing; the train tests below run the networks for real.
  generator, discriminator, latent = _make_pair(kind, height, width)
  z = jax.ShapeDtypeStruct((3, latent), jnp.float32)
  y = jax.ShapeDtypeStruct((3,), jnp.int32)
  x = jax.ShapeDtypeStruct((3, height, width, 3), jnp.float32)
  key = jax.random.PRNGKey(0)
  g_vars = jax.eval_shape(functools.partial(generator.init, train=False), key, z, y)
  d_vars = jax.eval_shape(functools.partial(discriminator.init, train=False), key, x, y)
  out, _ = jax.eval_shape(
      functools.partial(generator.apply, train=True, mutable=['batch_stats']), g_vars, z, y)
  logits, _ = jax.eval_shape(
      functools.partial(discriminator.apply, train=True, mutable=['batch_stats'],
                        rngs={'dropout': key}), d_vars, x, y)
  assert out.shape == (3, height, width, 3)
  assert logits.shape == (3,)


def test_paper_parameter_counts_at_60x80():
  z = jax.ShapeDtypeStruct((2, 100), jnp.float32)
  x = jax.ShapeDtypeStruct((2, 60, 80, 3), jnp.float32)
  key = jax.random.PRNGKey(0)
  g = jax.eval_shape(functools.partial(models.PaperGenerator(60, 80).init, train=False), key, z)
  d = jax.eval_shape(functools.partial(models.PaperDiscriminator().init, train=False), key, x)
  conv = lambda cin, cout: 9 * cin * cout + cout
  g_expected = (100 * 15 * 20 * 128 + 15 * 20 * 128  # dense
                + conv(128, 256) + 2 * 256 + conv(256, 128) + 2 * 128 + conv(128, 3))
  # 60x80 -> 30x40 -> 15x20 -> pad 16x21 -> 8x11 -> 8x11.
  d_expected = (conv(3, 32) + conv(32, 64) + 2 * 64 + conv(64, 128) + 2 * 128
                + conv(128, 256) + 2 * 256 + 8 * 11 * 256 + 1)
  assert count_params(g['params']) == g_expected == 4_472_835
  assert count_params(d['params']) == d_expected == 411_841


def test_cond_parameter_counts_at_60x80():
  config = config_sections.gan('cond')
  generator, discriminator = models.build_models(config, 60, 80, 4)
  z = jax.ShapeDtypeStruct((2, config.latent_dim), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  x = jax.ShapeDtypeStruct((2, 60, 80, 3), jnp.float32)
  key = jax.random.PRNGKey(0)
  g = jax.eval_shape(functools.partial(generator.init, train=False), key, z, y)
  d = jax.eval_shape(functools.partial(discriminator.init, train=False), key, x, y)
  c, k = config.channels, 4  # base width, classes
  conv = lambda cin, cout: 9 * cin * cout + cout
  one_by_one = lambda cin, cout: cin * cout + cout
  cbn = lambda ch: 2 * k * ch  # class embeddings of scale and shift; the norm itself has none

  def g_block(cin, cout):
    return cbn(cin) + conv(cin, cout) + cbn(cout) + conv(cout, cout) + one_by_one(cin, cout)

  g_expected = (k * 32  # class embedding, embed_dim 32
                + (config.latent_dim + 32) * 15 * 20 * 2 * c + 15 * 20 * 2 * c  # dense
                + g_block(2 * c, c) + g_block(c, c) + 2 * c + conv(c, 3))

  def d_block(cin, cout, shortcut=True):
    return conv(cin, cout) + conv(cout, cout) + (one_by_one(cin, cout) if shortcut else 0)

  d_expected = (d_block(3, c) + d_block(c, 2 * c) + d_block(2 * c, 4 * c)
                + d_block(4 * c, 4 * c, shortcut=False)  # same width, no downsampling
                + 4 * c + 1 + k * 4 * c)  # linear head and class projection
  assert count_params(g['params']) == g_expected == 3_142_883
  assert count_params(d['params']) == d_expected == 593_377
  # Spectral-norm vectors are state, not parameters.
  assert set(d) == {'params', 'batch_stats'}


# ----------------------------------------------------------------------------
# Losses


def test_bce_losses_at_zero_logits():
  zeros = jnp.zeros((5,))
  d = losses.discriminator_loss(real_logits=zeros, fake_logits=zeros, loss_type='bce')
  g = losses.generator_loss(fake_logits=zeros, loss_type='bce')
  np.testing.assert_allclose(d, 2 * math.log(2), rtol=1e-6)
  np.testing.assert_allclose(g, math.log(2), rtol=1e-6)


def test_bce_losses_hand_computed():
  real, fake = jnp.array([2.0, -1.0]), jnp.array([-1.0, 3.0])
  softplus = lambda t: math.log1p(math.exp(t))
  d_expected = (softplus(-2.0) + softplus(1.0)) / 2 + (softplus(-1.0) + softplus(3.0)) / 2
  g_expected = (softplus(1.0) + softplus(-3.0)) / 2  # non-saturating: -log sigmoid(f)
  np.testing.assert_allclose(
      losses.discriminator_loss(real_logits=real, fake_logits=fake, loss_type='bce'),
      d_expected, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_loss(fake_logits=fake, loss_type='bce'),
                             g_expected, rtol=1e-6)


def test_hinge_losses_hand_computed():
  real, fake = jnp.array([0.5, 2.0]), jnp.array([-0.5, 0.3])
  # mean(relu(1 - real)) = (0.5 + 0) / 2; mean(relu(1 + fake)) = (0.5 + 1.3) / 2.
  np.testing.assert_allclose(
      losses.discriminator_loss(real_logits=real, fake_logits=fake, loss_type='hinge'),
      0.25 + 0.9, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_loss(fake_logits=fake, loss_type='hinge'),
                             -(-0.5 + 0.3) / 2, rtol=1e-6)


def test_unknown_loss_type_raises():
  x = jnp.zeros((2,))
  with pytest.raises(ValueError, match='loss_type'):
    losses.discriminator_loss(real_logits=x, fake_logits=x, loss_type='wgan')
  with pytest.raises(ValueError, match='loss_type'):
    losses.generator_loss(fake_logits=x, loss_type='lsgan')


def test_r1_penalty_hand_computed():
  images = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 2))
  # Linear D: the gradient is w for every image.
  linear = lambda x: jnp.sum(x * w, axis=(1, 2, 3))
  np.testing.assert_allclose(losses.r1_penalty(logits_fn=linear, images=images),
                             jnp.sum(w ** 2), rtol=1e-5)
  # Quadratic D: the gradient is 2x.
  quadratic = lambda x: jnp.sum(x ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(losses.r1_penalty(logits_fn=quadratic, images=images),
                             jnp.mean(jnp.sum(4 * images ** 2, axis=(1, 2, 3))), rtol=1e-5)


# ----------------------------------------------------------------------------
# DiffAugment


def _images(key=0, shape=(4, H, W, 3)):
  return jax.random.uniform(jax.random.PRNGKey(key), shape, minval=0.1, maxval=1.0)


def test_diff_augment_keeps_shape_and_is_differentiable():
  x = _images(shape=(4, 24, 32, 3))
  key = jax.random.PRNGKey(1)
  augment = jax.jit(diffaug.diff_augment)
  out = augment(x, key)
  assert out.shape == x.shape and out.dtype == x.dtype
  grad = jax.jit(jax.grad(lambda t: jnp.sum(diffaug.diff_augment(t, key) ** 2)))(x)
  assert grad.shape == x.shape
  assert np.all(np.isfinite(grad)) and float(jnp.max(jnp.abs(grad))) > 0
  # Independent draws for independent keys (the real and fake batches).
  assert not np.allclose(out, augment(x, jax.random.PRNGKey(2)))


def test_diff_augment_identities():
  x = _images()
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(diffaug.diff_augment(x, key, policy=''), x)
  np.testing.assert_array_equal(diffaug.rand_translation(x, key, ratio=0.0), x)
  np.testing.assert_array_equal(diffaug.rand_cutout(x, key, ratio=0.0), x)


def test_translation_is_a_zero_filled_shift():
  x = np.asarray(_images())
  out = np.asarray(diffaug.rand_translation(jnp.asarray(x), jax.random.PRNGKey(4)))
  max_shift = int(H * 0.125 + 0.5)
  for img, res in zip(x, out):
    matches = []
    for dy in range(-max_shift, max_shift + 1):
      for dx in range(-max_shift, max_shift + 1):
        shifted = np.zeros_like(img)
        src = img[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)]
        shifted[max(-dy, 0):max(-dy, 0) + src.shape[0],
                max(-dx, 0):max(-dx, 0) + src.shape[1]] = src
        matches.append(np.array_equal(shifted, res))
    assert any(matches)


def test_cutout_zeros_one_rectangle():
  x = _images()  # no zeros in the input
  out = np.asarray(diffaug.rand_cutout(x, jax.random.PRNGKey(5)))
  for res in out:
    rows, cols = np.nonzero(np.all(res == 0, axis=-1))
    assert 4 * 4 <= rows.size <= 8 * 8
    # Zeros form a full rectangle.
    assert rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)


def test_unknown_policy_raises():
  with pytest.raises(ValueError, match='zoom'):
    diffaug.diff_augment(_images(), jax.random.PRNGKey(0), policy='color,zoom')


# ----------------------------------------------------------------------------
# Sampling real batches


def test_batch_samplers_respect_class_counts():
  images, labels = tiny_data()
  pool, counts = data.make_class_pool(images, labels, NUM_CLASSES)
  assert pool.shape == (2, 5, H, W, 3) and counts.tolist() == [3, 5]
  assert pool.min() >= -1.0 and np.all(pool[0, 3:] == 0)  # class 0 is padded
  real_by_class = [{img.tobytes() for img in images[labels == c] * 2 - 1} for c in range(2)]
  for c in range(2):
    batch, y = data.sample_class_batch(jax.random.PRNGKey(c), pool, counts, c, 64)
    assert np.all(y == c)
    assert all(np.asarray(b).tobytes() in real_by_class[c] for b in batch)
  n = 4096
  batch, y = data.sample_balanced_batch(jax.random.PRNGKey(7), pool, counts, n)
  assert all(np.asarray(b).tobytes() in real_by_class[int(c)] for b, c in zip(batch, y))
  # Uniform over classes: class 0 has p = 1/2, n/2 = 2048 +- 32 (one standard deviation);
  # uniform over the 8 images would give it p = 3/8, 1536, 16 deviations away.
  assert abs(int(np.sum(y == 0)) - n / 2) < 4 * 32
  # Within a class, uniform over its images: each of class 1's 5 is drawn 2048 / 5 ~ 410 +- 18
  # times.
  drawn = collections.Counter(np.asarray(b).tobytes() for b, c in zip(batch, y) if c == 1)
  assert len(drawn) == 5
  assert all(abs(count - np.sum(y == 1) / 5) < 4 * 18 for count in drawn.values())


def test_empty_class_raises():
  images, labels = tiny_data()
  with pytest.raises(ValueError, match='at least one image'):
    data.make_class_pool(images, labels, 3)


# ----------------------------------------------------------------------------
# Train step


def test_key_and_checkpoint_layout_pinned():
  assert train.STEP_STREAMS == ('data', 'd_latent', 'd_augment_real', 'd_augment_fake',
                                'd_dropout', 'g_latent', 'g_augment', 'g_dropout')
  rng = jax.random.PRNGKey(11)
  keys = train.step_keys(rng, 3)
  np.testing.assert_array_equal(
      keys['g_latent'], jax.random.fold_in(jax.random.fold_in(rng, 3), 5))
  assert [f.name for f in dataclasses.fields(train.GANState)] == [
      'g_params', 'g_batch_stats', 'd_params', 'd_state', 'g_opt_state', 'd_opt_state',
      'ema_g_params', 'step', 'rng']


def test_programs_are_shared_by_runs_that_differ_only_in_their_schedule():
  programs = lambda config: train.programs_for(config, height=H, width=W,
                                               num_classes=NUM_CLASSES)
  base = programs(tiny_config('paper'))
  assert programs(tiny_config('paper', steps=4, log_every=2, sample_every=2)) is base
  assert programs(tiny_config('paper', r1_gamma=1.0)) is not base
  assert programs(tiny_config('paper', conv_impl='xla')) is not base


def fresh_state(config, key=jax.random.PRNGKey(0)):
  """One GAN's initial state (through the compiled init that the runs use)."""
  states = train.init_gan_states(key[None], config, height=H, width=W,
                                 num_classes=NUM_CLASSES)
  return train.member_state(states, 0)


def test_one_discriminator_step_lowers_its_loss():
  # The step is the same code for both kinds; 'paper' compiles faster. R1 on,
  # so that the penalty's path through D is exercised too.
  config = tiny_config('paper', r1_gamma=1.0)
  state = fresh_state(config)
  images, labels = tiny_data()
  real = jnp.asarray(images[:4] * 2 - 1)
  y = jnp.asarray(labels[:4])
  step = jax.jit(functools.partial(train.discriminator_step, config=config,
                                   num_classes=NUM_CLASSES))
  objective = lambda m: float(m['d_loss'] + 0.5 * config.r1_gamma * m['r1'])
  new_state, before = step(state, real, y)
  # D's step leaves state.step alone, so a second call sees the same latents,
  # augmentations and dropout masks: the same batch, scored by the new D.
  assert int(new_state.step) == int(state.step)
  _, after = step(new_state, real, y)
  assert objective(after) < objective(before)
  assert float(before['r1']) > 0
  leaves_close(new_state.g_params, state.g_params, atol=0)  # G untouched


def test_update_ema():
  ema, params = {'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([3.0, 6.0])}
  # At step 0 the effective decay is min(0.9, 1/10) = 0.1.
  np.testing.assert_allclose(train.update_ema(ema, params, decay=0.9, step=0)['w'],
                             [0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * 6], rtol=1e-6)
  # Late in training it is the configured decay.
  np.testing.assert_allclose(train.update_ema(ema, params, decay=0.9, step=10_000)['w'],
                             [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 6], rtol=1e-5)
  # Decay 0: the raw parameters.
  assert train.update_ema(ema, params, decay=0.0, step=5) is params


# ----------------------------------------------------------------------------
# Runs: vmapped program, resumption, NaN guard, generation


@pytest.fixture(scope='module')
def paper_run(tmp_path_factory):
  """Two paper GANs (seed 0, classes 0 and 1) in one program, 2 steps."""
  config = tiny_config('paper', steps=2)
  images, labels = tiny_data()
  workdir = tmp_path_factory.mktemp('paper')
  state = train.train_gans(config, images, labels, num_classes=NUM_CLASSES, seeds=[0],
                           workdir=workdir, log=lambda s: None)
  logged = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return config, state, logged


def test_vmapped_paper_gans_match_training_each_class_alone(paper_run):
  config, stacked, logged = paper_run
  images, labels = tiny_data()
  pool, counts = data.make_class_pool(images, labels, NUM_CLASSES)
  step = jax.jit(functools.partial(train.train_step_from_pool, config=config,
                                   num_classes=NUM_CLASSES))
  generator, discriminator = models.build_models(config, H, W, NUM_CLASSES)
  z = jax.random.normal(jax.random.PRNGKey(5), (4, config.latent_dim))
  x = jnp.asarray(images[:4] * 2 - 1)
  g_out = jax.jit(lambda s: generator.apply(
      {'params': s.g_params, 'batch_stats': s.g_batch_stats}, z, train=True,
      mutable=['batch_stats'])[0])
  d_out = jax.jit(lambda s: discriminator.apply(
      {'params': s.d_params, **s.d_state}, x, train=True, mutable=['batch_stats'],
      rngs={'dropout': jax.random.PRNGKey(6)})[0])
  for c in range(NUM_CLASSES):
    # Member (seed 0, class c) of the stacked program.
    state = fresh_state(config, jax.random.fold_in(jax.random.PRNGKey(0), c))
    for i in range(config.steps):
      state, metrics = step(state, pool, counts, c)
      for name, value in metrics.items():
        np.testing.assert_allclose(value, logged[i][name][c], rtol=1e-4, atol=1e-6)
    member = train.member_state(stacked, c)
    assert int(member.step) == int(state.step) == config.steps
    # Same networks: G and D (train mode, fixed dropout) give the same outputs.
    np.testing.assert_allclose(g_out(member), g_out(state), atol=1e-4)
    np.testing.assert_allclose(d_out(member), d_out(state), rtol=1e-3, atol=1e-4)
    # Same parameters, but for rounding noise: the exact gradient of a bias
    # that feeds BatchNorm is 0, and Adam turns the batched kernels' different
    # rounding into steps of size lr there (which BatchNorm cancels); a few
    # other entries with near-zero gradients move the same way.
    feeds_batchnorm = {('g_params', 'Conv_0', 'bias'), ('g_params', 'Conv_1', 'bias'),
                       ('d_params', 'Conv_1', 'bias'), ('d_params', 'Conv_2', 'bias'),
                       ('d_params', 'Conv_3', 'bias')}
    for name in ('g_params', 'd_params'):
      ours = jax.tree_util.tree_flatten_with_path(getattr(member, name))[0]
      alone = jax.tree.leaves(getattr(state, name))
      for (path, a), b in zip(ours, alone, strict=True):
        diff = np.abs(np.asarray(a) - np.asarray(b))
        if (name,) + tuple(k.key for k in path) in feeds_batchnorm:
          assert diff.max() <= 2 * config.lr_g * config.steps
        else:
          assert np.mean(diff > 1e-5) <= 1e-3, (name, path)


def test_generate_paper_uses_the_class_generator(paper_run):
  config, stacked, _ = paper_run
  key = jax.random.PRNGKey(9)
  images, y = sample.generate(stacked, config, num_per_class={1: 3}, key=key, height=H,
                             width=W, num_classes=NUM_CLASSES)
  assert images.shape == (3, H, W, 3) and y.tolist() == [1, 1, 1]
  member = train.member_state(stacked, 1)
  class_key = jax.random.fold_in(key, 1)
  z = jnp.stack([jax.random.normal(jax.random.fold_in(class_key, j), (config.latent_dim,))
                 for j in range(3)])
  direct = models.PaperGenerator(H, W).apply(
      {'params': member.g_params, 'batch_stats': member.g_batch_stats}, z, train=False)
  np.testing.assert_allclose(images, (np.asarray(direct) + 1) / 2, atol=1e-5)


def test_nan_guard_names_the_step_and_saves_nothing(tmp_path):
  config = tiny_config('paper', steps=2)
  images, labels = tiny_data()
  images = np.full_like(images, np.nan)
  with pytest.raises(RuntimeError, match=r'Non-finite \w+ at step 0'):
    train.train_gans(config, images, labels, num_classes=NUM_CLASSES, seeds=[0],
                     workdir=tmp_path, log=lambda s: None)
  assert not (tmp_path / 'DONE.json').exists()
  assert not [p for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]


@pytest.fixture(scope='module')
def cond_runs(tmp_path_factory):
  """Cond GAN over two seeds: 4 steps straight vs 2 steps, then resumed to 4."""
  images, labels = tiny_data()
  run = functools.partial(train.train_gans, images=images, labels=labels,
                          num_classes=NUM_CLASSES, seeds=[0, 1])
  straight_dir = tmp_path_factory.mktemp('straight')
  straight = run(tiny_config('cond', steps=4, checkpoint_every=2, sample_every=2),
                 workdir=straight_dir, log=lambda s: None)
  resumed_dir = tmp_path_factory.mktemp('resumed')
  run(tiny_config('cond', steps=2, checkpoint_every=2), workdir=resumed_dir, log=lambda s: None)
  messages = []
  resumed = run(tiny_config('cond', steps=4, checkpoint_every=2), workdir=resumed_dir,
                log=messages.append)
  return straight, straight_dir, resumed, resumed_dir, messages


@pytest.mark.slow
def test_restart_gives_the_same_final_state(cond_runs):
  straight, straight_dir, resumed, resumed_dir, messages = cond_runs
  assert any('Restored step 2' in m for m in messages)
  assert straight.step.tolist() == resumed.step.tolist() == [4, 4]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Spectral norm's power iteration advanced (sigma starts at 1).
  sigmas = [x for path, x in jax.tree_util.tree_flatten_with_path(straight.d_state)[0]
            if jax.tree_util.keystr(path).endswith("sigma']")]
  assert len(sigmas) == 13 and all(not np.allclose(s, 1.0) for s in sigmas)
  # Seeds are independent GANs.
  assert not np.allclose(jax.tree.leaves(straight.g_params)[0][0],
                         jax.tree.leaves(straight.g_params)[0][1])
  assert json.loads((resumed_dir / 'DONE.json').read_text())['step'] == 4
  logged = [json.loads(line) for line in (straight_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [m['step'] for m in logged] == [1, 2, 3, 4]
  assert all(len(m['d_loss']) == 2 for m in logged)  # per seed
  # The resumed run logged the same numbers, each step once.
  assert (resumed_dir / 'metrics.jsonl').read_text() == (straight_dir / 'metrics.jsonl').read_text()
  assert (straight_dir / 'samples' / 'step_000002.png').exists()
  assert (straight_dir / 'samples' / 'step_000004.png').exists()


@pytest.mark.slow
def test_completed_run_only_restores(cond_runs):
  straight, straight_dir, *_ = cond_runs
  images, labels = tiny_data()
  messages = []
  again = train.train_gans(tiny_config('cond', steps=4, checkpoint_every=2, sample_every=2),
                           images, labels, num_classes=NUM_CLASSES, seeds=[0, 1],
                           workdir=straight_dir, log=messages.append)
  assert any('complete' in m for m in messages)
  leaves_close(again, straight, atol=0)


def test_resuming_with_other_seeds_raises(cond_runs):
  _, straight_dir, *_ = cond_runs
  images, labels = tiny_data()
  with pytest.raises(ValueError, match='different config, seeds or data'):
    train.train_gans(tiny_config('cond', steps=4), images, labels, num_classes=NUM_CLASSES,
                     seeds=[0, 2], workdir=straight_dir, log=lambda s: None)


def test_generate_cond(cond_runs):
  straight, *_ = cond_runs
  config = tiny_config('cond')
  key = jax.random.PRNGKey(1)
  kwargs = dict(key=key, height=H, width=W, num_classes=NUM_CLASSES, seed_index=1)
  images, y = sample.generate(straight, config, num_per_class={0: 3, 1: 2}, **kwargs)
  assert images.shape == (5, H, W, 3) and images.dtype == np.float32
  assert y.tolist() == [0, 0, 0, 1, 1]
  assert images.min() >= 0.0 and images.max() <= 1.0
  images_list, _ = sample.generate(straight, config, num_per_class=[3, 2], **kwargs)
  np.testing.assert_array_equal(images, images_list)
  # Chunking does not change the images.
  images_small, _ = sample.generate(straight, config, num_per_class=[3, 2], batch_size=2,
                                   **kwargs)
  np.testing.assert_allclose(images, images_small, atol=1e-6)
  other_seed, _ = sample.generate(straight, config, num_per_class=[3, 2],
                                 **{**kwargs, 'seed_index': 0})
  assert not np.allclose(images, other_seed)


def test_resize_images():
  x = np.full((3, 24, 32, 3), 0.25, np.float32)
  x[1] = 0.75
  y = sample.resize_images(x, (12, 16), batch=2)
  assert y.shape == (3, 12, 16, 3) and y.dtype == np.float32
  np.testing.assert_allclose(y[0], 0.25, atol=1e-6)
  np.testing.assert_allclose(y[1], 0.75, atol=1e-6)
  np.testing.assert_array_equal(sample.resize_images(x, (24, 32)), x)  # same size: unchanged
  assert sample.resize_images(x[:0], (12, 16)).shape == (0, 12, 16, 3)


def _gan_ablation(**gan_fields):
  """configs/ablation.py:test with a GAN regime and these config.gan fields."""
  config = ablation_config.get_config('test')
  config.ablation.regimes = ('original+gan',)
  config.gan.update(gan_fields)
  return config


@pytest.mark.parametrize('resolution', [(30, 40), (12,), (0, 8)])
def test_bad_resolution_is_named(resolution):
  with pytest.raises(ValueError, match='config.gan.resolution'):
    ablation.validate(_gan_ablation(resolution=resolution))


@pytest.mark.parametrize('resolution', [(30, 40), (12,)])
def test_bad_per_view_resolution_is_named(resolution):
  config = _gan_ablation()
  config.gan.resolution_by_view.crop = resolution
  with pytest.raises(ValueError, match='config.gan.resolution_by_view.crop'):
    ablation.validate(config)


def test_gan_resolution_prefers_the_views_own_then_the_common_then_the_input():
  config = config_sections.gan('paper')
  config.resolution_by_view.frame = (24, 32)
  assert ablation.gan_resolution(config, 'frame', (60, 80)) == (24, 32)
  assert ablation.gan_resolution(config, 'crop', (32, 32)) == (32, 32)
  config.resolution = (16, 16)
  assert ablation.gan_resolution(config, 'crop', (32, 32)) == (16, 16)
  assert ablation.gan_resolution(config, 'frame', (60, 80)) == (24, 32)


@pytest.mark.parametrize('arg', ['quick', 'quick,paper_gan'])
def test_quick_gans_train_frames_small_and_crops_at_their_size(arg):
  quick = ablation_config.get_config(arg)
  assert ablation.gan_resolution(quick.gan, 'frame', (60, 80)) == (24, 32)
  assert ablation.gan_resolution(quick.gan, 'crop', (32, 32)) == (32, 32)
  # Other variants train the GAN at the classifier's input.
  study_frame = ablation_config.get_config('study_frame')
  assert ablation.gan_resolution(study_frame.gan, 'frame', (60, 80)) == (60, 80)


@pytest.mark.parametrize('per_view', [False, True])
@pytest.mark.slow
def test_gan_at_its_own_resolution_gives_classifier_sized_images(test_config, tmp_path,
                                                                 per_view):
  """A GAN at 12x16 (gan.resolution, or the frame view's own) trains on the 24x32 training
  images shrunk to 12x16; its samples come back at 24x32 for the classifier."""
  from wbc_jax import input_pipeline as ip
  config = test_config.copy_and_resolve_references()
  if per_view:
    config.gan.resolution_by_view.frame = (12, 16)
    config.gan.resolution_by_view.crop = (8, 8)  # another view's: not used here
  else:
    config.gan.resolution = (12, 16)
  examples = ip.load_examples(config.data)
  split = ip.make_splits(examples.labels, config.split)[0]
  lines = []
  images, labels = ablation.synthetic_images(config, str(tmp_path), 'frame', examples, split,
                                             log=lines.append)
  assert images.shape[1:] == examples.images.shape[1:] == (24, 32, 3) and images.dtype == np.uint8
  counts = np.bincount(examples.labels[split.train], minlength=4)
  assert np.array_equal(np.bincount(labels, minlength=4),
                        np.maximum(config.synthetic.target_per_class - counts, 0))
  run = json.load(open(tmp_path / 'frame' / 'holdout' / 'gan_cond' / 'run.json'))
  assert run['image_shape'] == [12, 16, 3]
  assert any('at 12x16 (resized from 24x32)' in line for line in lines)
