r"""Entry point: `python -m wbc_jax.main --config=configs/ablation.py --workdir=DIR`.

Defines only the flags, logs the devices, and hands the config to the ablation driver.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/ablation.py:quick.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax  # after flag parsing, so --help is fast
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from wbc_jax import ablation
  print(f'JAX {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}',
        flush=True)
  ablation.run(FLAGS.config, FLAGS.workdir, log=lambda s: print(s, flush=True))


def cli():
  app.run(main)


if __name__ == '__main__':
  cli()
