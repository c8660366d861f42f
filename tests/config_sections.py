"""Config sections with every field at its default, for tests of one function.

The defaults live in configs/ablation.py only; a test that needs `config.train` with a
learning rate of its own takes the `:test` config's section and changes that field (a
misspelt field is an error: the section stays locked).
"""

from configs import ablation as ablation_config


def section(name: str, **fields):
  """`config.<name>` of configs/ablation.py:test, with `fields` changed."""
  out = getattr(ablation_config.get_config('test'), name).copy_and_resolve_references()
  out.update(fields)
  return out


def gan(kind: str, **fields):
  """configs/ablation.py's GAN config of `kind` (its own defaults), with `fields` changed."""
  out = ablation_config.gan_config(kind)
  out.update(fields)
  return out
