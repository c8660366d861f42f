"""The published study's Table 2, as printed by its own notebooks.

Source: the public repository rupashi97/WBC-GAN-Enhancement. Each notebook under `classifiers/`
trains one cell of the ablation {original, original+trad, original+gan, original+gan+trad} x
{CNN, CNN-RNN} and prints `Test accuracy: ...` in its saved output; `line` below is that printed
line, copied verbatim. A cell with no printed number would be `None` and shows as "not
reported"; none is missing today.

How the numbers were measured matters more than their size. Every notebook splits with
`train_test_split(data, labels, test_size=0.15, random_state=42)` (not stratified) AFTER the
data set was assembled. In the two original-data regimes that is 369 real images (56 test
images). In the two GAN regimes it is the 1,200-image `GAN AUGMENTED DATA` folder (each class
topped up to 300 with generated images), so most of the 180 test images are synthetic and the
GAN that drew them saw the real test images. The report prints these numbers beside ours with
that caveat and never mixes them into our tables.

Checked in the notebooks' code (not only their names): `cnn_original_trad_augmented` trains on
the 369 real images with a horizontal-flip generator; `cnn_rnn_augmented` loads the GAN folder
with the traditional-augmentation generator commented out, and `cnn_rnn_all_data` loads the
same folder with rotation (5 degrees) and horizontal flips; `cnn_all_data` loads it with
rotation (10 degrees) and horizontal flips. `cnn_gan_augmented` is mapped by its name and its
180 test images (the GAN folder). So the repository README's "an
ensemble of GAN and traditional methods ... best test accuracy of 87.77%" matches the printed
0.8777... of the GAN-only CNN-RNN notebook, not of the GAN+trad one (0.85).
"""

from __future__ import annotations

import dataclasses

REPOSITORY = 'rupashi97/WBC-GAN-Enhancement'
NOTEBOOK_COMMIT = '746a1aabbfef467342fe167c8e7e7217618eda68'
README_COMMIT = '3caa679e3db1afc8ea1a3ed2f33b50ac4461b20d'
README_BEST_LINE = ('demonstrates an ensemble of GAN and traditional methods to achieve the best '
                    'test accuracy of 87.77%.')

CAVEAT = ('measured on a test split drawn after synthetic images were mixed in '
          '(mostly synthetic for the GAN regimes)')


@dataclasses.dataclass(frozen=True)
class PaperCell:
  """One printed test accuracy of the study.

  accuracy: the printed value as a rate in [0, 1], or None where the study printed none.
  n_test: test images behind it (the notebook's printed `xtest shape`/support total).
  """
  regime: str
  model: str
  accuracy: float | None
  n_test: int | None
  path: str
  commit: str
  line: str


def _cell(regime, model, accuracy, n_test, notebook, line):
  return PaperCell(regime, model, accuracy, n_test, f'classifiers/{notebook}', NOTEBOOK_COMMIT,
                   line)


TABLE2: tuple[PaperCell, ...] = (
    _cell('original', 'cnn', 0.4821428656578064, 56, 'cnn_original_data.ipynb',
          'Test accuracy: 0.4821428656578064'),
    _cell('original', 'cnn_rnn', 0.5892857313156128, 56, 'cnn_rnn_original_data.ipynb',
          'Test accuracy: 0.5892857313156128'),
    _cell('original+trad', 'cnn', 0.625, 56, 'cnn_original_trad_augmented.ipynb',
          'Test accuracy: 0.625'),
    _cell('original+trad', 'cnn_rnn', 0.6607142686843872, 56, 'cnn_rnn_original_trad.ipynb',
          'Test accuracy: 0.6607142686843872'),
    _cell('original+gan', 'cnn', 0.8333333134651184, 180, 'cnn_gan_augmented.ipynb',
          'Test accuracy: 0.8333333134651184'),
    _cell('original+gan', 'cnn_rnn', 0.8777777552604675, 180, 'cnn_rnn_augmented.ipynb',
          'Test accuracy: 0.8777777552604675'),
    _cell('original+gan+trad', 'cnn', 0.8666666746139526, 180, 'cnn_all_data.ipynb',
          'Test accuracy: 0.8666666746139526'),
    _cell('original+gan+trad', 'cnn_rnn', 0.8500000238418579, 180, 'cnn_rnn_all_data.ipynb',
          'Test accuracy: 0.8500000238418579'),
)


def lookup(regime: str, model: str) -> PaperCell | None:
  """The study's cell for (regime, model), or None if the study has no such cell (e.g. resnet)."""
  for cell in TABLE2:
    if cell.regime == regime and cell.model == model:
      return cell
  return None
