"""What a run learns from its real training images: which ones it fits, and what their class
frequencies set (the loss's class weights and logit offsets, the prediction's prior correction).
"""

from __future__ import annotations

import numpy as np

from wbc_jax import input_pipeline as ip


FIT_ON = ('train', 'train+val')


def fit_indices(split: ip.Split, train_config) -> np.ndarray:
  """The real images a run trains on: the training split, or with train.fit_on='train+val'
  the validation images too (the recipe chosen on validation, then refit on both; only a
  fixed schedule, select='last', can do without a held-out validation set)."""
  fit_on = train_config.fit_on
  if fit_on not in FIT_ON:
    raise ValueError(f"config.train.fit_on: unknown value {fit_on!r}; expected one of "
                     f"{', '.join(FIT_ON)}.")
  if fit_on == 'train':
    return np.asarray(split.train)
  if train_config.select != 'last':
    raise ValueError(f"config.train.fit_on='train+val' trains on the validation images, so "
                     f"config.train.select must be 'last', not {train_config.select!r}.")
  return np.concatenate([split.train, split.val])


def loss_constants(labels: np.ndarray, num_classes: int, train_config) -> dict[str, np.ndarray]:
  """The train step's per-run constants, from the training labels (real + synthetic).

  class_weights [C]: inverse class frequency with train.class_weighting, else ones.
  logit_offset [C]: tau * log(class prior) with train.logit_adjust_tau = tau > 0, else
    zeros. Added to the logits in the loss only (Menon et al., 2021, "Long-tail learning
    via logit adjustment"), it makes the unadjusted logits estimate a class-balanced
    posterior: the minority classes are not argued down by their prior.
  """
  tau = float(train_config.logit_adjust_tau)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  prior = np.maximum(counts, 1) / max(counts.sum(), 1)
  return {'class_weights': class_weights_for(labels, num_classes, train_config.class_weighting),
          'logit_offset': (tau * np.log(prior) if tau > 0 else np.zeros(num_classes))
          .astype(np.float32)}


def prior_log_bias(labels: np.ndarray, num_classes: int, tau: float) -> np.ndarray:
  """tau * log(class prior of `labels`) [C], float32: `TrainState.class_log_bias`.

  A model trained on class-balanced batches estimates a posterior under a uniform prior;
  multiplying its probabilities by prior ** tau moves it towards the training prior (tau = 1:
  the full Bayes correction, best for plain accuracy; tau = 0: none, best for balanced
  accuracy). Its value is chosen on validation (experiments/baseline/prior.md).
  """
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  prior = np.maximum(counts, 1) / max(counts.sum(), 1)
  return (float(tau) * np.log(prior)).astype(np.float32)


def class_weights_for(labels: np.ndarray, num_classes: int, enabled: bool) -> np.ndarray:
  if not enabled:
    return np.ones(num_classes, np.float32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  # Keras/sklearn "balanced": n / (C * count); absent classes get weight 0.
  w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  return w.astype(np.float32)
