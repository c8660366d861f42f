"""The regimes and models an ablation is made of, each named once.

Configs list these names (`config.ablation.regimes`, `config.ablation.models`), run
directories are named after them (`wbc_jax.rundir`), the driver acts on them
(`wbc_jax.ablation`), and the report orders and labels its rows by them (`wbc_jax.report`),
all through this module. The views are the input pipeline's (`input_pipeline.VIEWS`); the
networks are `models.MODEL_LABELS` and the non-deep floor is `floor.NAME`.

Adding a regime is one `Regime` in REGIMES (and a case in tests/test_names.py): its position
is its place in the report's tables, `trad` and `gan` say what it adds to the real training
images, and the driver, the configs' default list and the report's labels follow.
"""

from __future__ import annotations

import dataclasses

from wbc_jax import floor
from wbc_jax import models


@dataclasses.dataclass(frozen=True)
class Regime:
  """What one regime trains on.

  name: as configs and results.json spell it, e.g. 'original+gan+trad'.
  label: its name in the report's tables.
  trad: the training images get the traditional augmentation (`config.augment`).
  gan: each class of the training split is topped up with GAN images (`config.gan`).
  description: one phrase for the report's note on regimes.
  """
  name: str
  label: str
  trad: bool
  gan: bool
  description: str


# In the report's order.
REGIMES = (
    Regime('original', 'original', trad=False, gan=False,
           description='the real training images'),
    Regime('original+trad', 'trad', trad=True, gan=False,
           description='original with traditional augmentation'),
    Regime('original+gan', 'GAN', trad=False, gan=True,
           description='original topped up with GAN images'),
    Regime('original+gan+trad', 'GAN+trad', trad=True, gan=True, description='both'),
)
REGIME_NAMES = tuple(r.name for r in REGIMES)
REGIME_LABELS = {r.name: r.label for r in REGIMES}
REGIME_NOTE = 'Regimes: ' + '; '.join(f'{r.label} = {r.description}' for r in REGIMES) + '.'

# Every model an ablation can train, in the report's order: the networks, then the floor.
MODEL_LABELS = {**models.MODEL_LABELS, floor.NAME: floor.LABEL}
MODEL_NAMES = tuple(MODEL_LABELS)


def regime(name: str) -> Regime:
  """The regime called `name`; a ValueError names the config field and the known names."""
  for r in REGIMES:
    if r.name == name:
      return r
  raise ValueError(f'config.ablation.regimes: unknown regime {name!r}; expected one of '
                   f'{", ".join(REGIME_NAMES)}.')
