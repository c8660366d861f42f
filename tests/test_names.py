"""The regimes and models of the ablation (wbc_jax.names): one table, read by every module.

Adding a regime: one `names.Regime` in `names.REGIMES`, and its row in EXPECTED below.
"""

import pytest

from configs import ablation as ablation_config
from wbc_jax import floor
from wbc_jax import models
from wbc_jax import names
from wbc_jax import paper_results
from wbc_jax import rundir

# name: (label, traditional augmentation, GAN images, run directory)
EXPECTED = {
    'original': ('original', False, False, 'original'),
    'original+trad': ('trad', True, False, 'original_trad'),
    'original+gan': ('GAN', False, True, 'original_gan'),
    'original+gan+trad': ('GAN+trad', True, True, 'original_gan_trad'),
}


def test_regimes_table():
  assert names.REGIME_NAMES == tuple(EXPECTED)
  for name, (label, trad, gan, dir_name) in EXPECTED.items():
    regime = names.regime(name)
    assert (regime.label, regime.trad, regime.gan) == (label, trad, gan)
    assert names.REGIME_LABELS[name] == label
    assert rundir.regime_dir_name(name) == dir_name
    assert rundir.regime_of_dir_name(dir_name) == name


def test_unknown_regime_names_the_field():
  with pytest.raises(ValueError, match=r"config.ablation.regimes: unknown regime 'gan'"):
    names.regime('gan')


def test_regime_note_lists_every_regime():
  assert names.REGIME_NOTE == (
      'Regimes: original = the real training images; trad = original with traditional '
      'augmentation; GAN = original topped up with GAN images; GAN+trad = both.')


def test_configs_and_paper_table_use_the_names():
  for variant in ('', 'quick', 'study', 'study_frame'):
    assert ablation_config.get_config(variant).ablation.regimes == names.REGIME_NAMES
  assert {c.regime for c in paper_results.TABLE2} <= set(names.REGIME_NAMES)
  assert {c.model for c in paper_results.TABLE2} <= set(names.MODEL_NAMES)


def test_models_are_the_networks_then_the_floor():
  assert names.MODEL_NAMES == models.MODEL_NAMES + (floor.NAME,)
  assert names.MODEL_LABELS == {'cnn': 'CNN', 'cnn_rnn': 'CNN-RNN', 'resnet': 'ResNet',
                                'cellnet': 'cellnet', 'floor': 'non-deep floor'}
