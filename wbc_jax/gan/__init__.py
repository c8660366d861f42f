"""GAN-based data augmentation: networks, losses, DiffAugment, training and sampling.

A library: it knows GANs, not the ablation (views, regimes, run directories), and imports
nothing of it.
"""

from wbc_jax.gan.diffaug import diff_augment
from wbc_jax.gan.losses import discriminator_loss, generator_loss, r1_penalty
from wbc_jax.gan.models import (CondDiscriminator, CondGenerator, PaperDiscriminator,
                                PaperGenerator)
from wbc_jax.gan.sample import generate
from wbc_jax.gan.train import (GANPrograms, GANState, gan_train_step, init_gan_state,
                               init_gan_states, make_programs, member_layout, member_state,
                               train_gans)
