r"""Entry point: `python -m wbc_jax.main --config=configs/ablation.py --workdir=DIR`.

Defines only the flags, joins a multi-process run if there is one, logs the devices,
and hands the config to the ablation driver.

Several processes (one per host, or per GPU) run the same command; they find each
other through `jax.distributed` (`wbc_jax.sharding.initialize_distributed`): with
--coordinator_address, --num_processes and --process_id, or, with none of them, by
themselves under `srun` with more than one task or on a multi-host Cloud TPU. The
launchers in scripts/ set this up. Only process 0 logs and writes files; at the end
every process prints its final metrics, which are the same in every process.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/ablation.py:quick.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 in a multi-process run (jax.distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax  # after flag parsing, so --help is fast
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from wbc_jax import sharding
  try:
    joined = sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                             FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e))
  from wbc_jax import ablation
  primary = sharding.is_primary()
  log = (lambda s: print(s, flush=True)) if primary else (lambda s: None)
  log(f'JAX {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}')
  if joined:
    log(f'{jax.process_count()} processes ({joined}), {jax.local_device_count()} devices each '
        f'here; {jax.device_count()} in all')
  if jax.process_count() > 1:
    # Process 0 prepares the TFDS dataset on first use (several preparing the same
    # directory would race), the others wait for it and then read it.
    from jax.experimental import multihost_utils
    from wbc_jax import input_pipeline as ip
    if primary:
      ip.load_raw(FLAGS.config.data)
    multihost_utils.sync_global_devices('wbc_jax: dataset prepared')
  rows = ablation.run(FLAGS.config, FLAGS.workdir, log=log)
  if jax.process_count() > 1:
    # Timings differ between processes; every other column must not.
    final = [{k: v for k, v in r.items() if k != 'train_seconds'} for r in rows]
    print(f'process {jax.process_index()} of {jax.process_count()} final: '
          + json.dumps(final, sort_keys=True), flush=True)


def cli():
  app.run(main)


if __name__ == '__main__':
  cli()
