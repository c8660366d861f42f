"""GAN-based data augmentation: networks, losses, DiffAugment, training and sampling."""

from wbc_jax.gan.diffaug import diff_augment
from wbc_jax.gan.losses import discriminator_loss, generator_loss, r1_penalty
from wbc_jax.gan.models import (CondDiscriminator, CondGenerator, PaperDiscriminator,
                                PaperGenerator)
from wbc_jax.gan.train import (GANState, gan_train_step, generate,
                               init_gan_state, init_gan_states, member_layout, member_state,
                               train_gans, train_gans_step)
