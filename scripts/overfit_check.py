r"""Sanity check that a classifier can fit a small training set (8 images per class).

  python scripts/overfit_check.py MODEL LEARNING_RATE EPOCHS   # e.g. cnn 1e-3 30

Uses the crop view of the `:quick` config and one 32-image batch per epoch, no
augmentation; prints (epoch, training loss, accuracy on those 32 images) every 5 epochs.
A model that cannot climb well above 25% here has a pipeline or model bug.
"""
import os
import sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.ablation import get_config
from wbc_jax import evaluation, input_pipeline as ip, train, models
from wbc_jax import training_set
c = get_config('quick')
with c.unlocked(): c.data.view='crop'; c.train.learning_rate=float(sys.argv[2])
ex = ip.load_examples(c.data)
idx = np.concatenate([np.flatnonzero(ex.labels==k)[:8] for k in range(4)])
x, y = ex.images[idx], ex.labels[idx]
m = models.get_model(sys.argv[1], num_classes=4)
p = train.make_programs(m, train.make_optimizer(c.train), x.shape[1:])
st = p.init(train.seed_keys([0]))
cw = training_set.loss_constants(y, 4, c.train)
for ep in range(int(sys.argv[3])):
  for b in ip.train_batches(x, y, seeds=[0], epoch=ep, batch_size=32, aug=c.augment, augment=False):
    st, met = p.train_step(st, b, cw)
  if ep % 5 == 4:
    pr = evaluation.predict_probs(p.predict, st.params, st.batch_stats, x, 64, st.predict_consts)
    print(ep + 1, float(met['loss'][0])/32, (pr.argmax(-1)==y).mean(), flush=True)
