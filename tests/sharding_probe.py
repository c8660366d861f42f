"""Run by tests/test_sharding.py in a process with 4 emulated CPU devices (XLA_FLAGS set
before jax is imported); prints one JSON object describing where the arrays live.

  python tests/sharding_probe.py RUN_DIR

RUN_DIR: a finished 4-seed cnn run of configs/ablation.py:test on the default mesh.
Checks: the checkpoint restores into the seed-sharded layout; a train step keeps it;
batches are split over ('seed', 'data'); a ('seed', 'data') = (2, 2) mesh trains and
predicts like (4, 1); a seed count the mesh cannot split is refused.
"""

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from wbc_jax import models, sharding, train
from wbc_jax import training_set


def layout(tree) -> dict:
  """Where the leaves of a seed-vmapped pytree live: specs, shards per leaf, seeds per shard."""
  leaves = jax.tree.leaves(tree)
  return {
      'leaves': len(leaves),
      'specs': sorted({str(tuple(x.sharding.spec)) for x in leaves}),
      'shards_per_leaf': sorted({len(x.addressable_shards) for x in leaves}),
      'devices_per_leaf': sorted({len({s.device for s in x.addressable_shards}) for x in leaves}),
      'seeds_per_shard': sorted({s.data.shape[0] for x in leaves for s in x.addressable_shards}),
  }


def main(run_dir: str) -> dict:
  config = ml_collections.ConfigDict(json.load(open(os.path.join(run_dir, 'config.json'))))
  num_seeds = config.num_seeds
  image_shape = (*config.data.frame_size, 3)
  model = models.get_model('cnn', num_classes=4, conv_impl=config.train.conv_impl)
  tx = train.make_optimizer(config.train)
  out = {'device_count': jax.device_count()}

  mesh = sharding.make_mesh(config.mesh)
  out['mesh'] = dict(mesh.shape)
  programs = train.make_programs(model, tx, image_shape, mesh)
  keys = sharding.put(np.asarray(train.seed_keys(range(num_seeds))), programs.seed_sharding)
  abstract = sharding.abstract_like(jax.eval_shape(programs.init, keys), programs.seed_sharding)
  with ocp.CheckpointManager(os.path.join(run_dir, 'checkpoints')) as manager:
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
  out['restored'] = layout(state)
  out['restored_epoch'] = sharding.to_host(state.epoch).tolist()

  rng = np.random.default_rng(0)
  batch = {'image': rng.random((num_seeds, config.train.batch_size, *image_shape), np.float32),
           'label': rng.integers(0, 4, (num_seeds, config.train.batch_size)).astype(np.int32)}
  weights = training_set.loss_constants(np.arange(4), 4, config.train)
  placed = {k: sharding.put(v, programs.batch_sharding) for k, v in batch.items()}
  out['batch'] = layout(placed)
  state, metrics = programs.train_step(state, placed, weights)
  out['after_step'] = layout(state)
  out['metrics'] = layout(metrics)

  # Data parallelism: (seed, data) = (2, 2) against (4, 1), from the same initial state.
  losses, params, probs = {}, {}, {}
  data_mesh = sharding.make_mesh(ml_collections.ConfigDict({'seed': 2, 'data': 2}))
  for name, p in {'seed4': programs,
                  'seed2_data2': train.make_programs(model, tx, image_shape, data_mesh)}.items():
    s = p.init(sharding.put(np.asarray(train.seed_keys(range(num_seeds))), p.seed_sharding))
    b = {k: sharding.put(v, p.batch_sharding) for k, v in batch.items()}
    run = []
    for _ in range(2):
      s, mt = p.train_step(s, b, weights)
      run.append(sharding.to_host(mt['loss']).tolist())
    losses[name] = run
    params[name] = sharding.to_host(s.params)
    # Evaluation batches of any size, split along 'data' inside the program; 5 rows do
    # not split evenly over 2 devices.
    probs[name] = sharding.to_host(p.predict(s.params, s.batch_stats, batch['image'][0, :5],
                                                   s.predict_consts))
    if name == 'seed2_data2':
      out['data_parallel_batch'] = layout(b)
      out['data_parallel_state'] = layout(s)
      out['data_parallel_image_shard'] = list(b['image'].addressable_shards[0].data.shape)
  out['losses'] = losses
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)),
      params['seed4'], params['seed2_data2']))
  out['params_max_rel_diff'] = max(diffs)
  out['predict_shape'] = list(probs['seed2_data2'].shape)
  out['predict_max_abs_diff'] = float(np.max(np.abs(probs['seed4'] - probs['seed2_data2'])))

  try:
    sharding.check_divisible(3, config.train.batch_size, mesh)
    out['indivisible_error'] = None
  except ValueError as e:
    out['indivisible_error'] = str(e)
  return out


if __name__ == '__main__':
  print('PROBE ' + json.dumps(main(sys.argv[1])), flush=True)
