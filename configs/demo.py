"""The embedded default: a few-shot learning curve on SYNTHETIC images (no download, no real faces).

The images are procedurally generated (agejax/data/synthetic.py): a disk whose size and stripes grow
with the label, so the label can be learned from the pixels. Two priors, as in the paper: a tiny
VGG-16 from scratch, and the same network pre-trained on a separate, differently distributed synthetic
source (a stand-in for DEX pre-trained on IMDB-WIKI). Both get a regression head and Adam (a DEX
softmax head learns too slowly from scratch for a 2-minute demo); 32 trials at the smallest size.

  python -m agejax.main --config configs/demo.py --workdir /tmp/agejax_demo
  python -m agejax.main --config configs/demo.py:quick --workdir /tmp/agejax_demo_quick   # tests
  python -m agejax.main --config configs/demo.py:quick,tiny --workdir /tmp/t   # engine tests: one prior, seconds

`sizes` is a tuple, so the command line can replace it: --config.sizes='((3, 4, 4, 6), (6, 4, 4, 6))'.
"""

import ml_collections

from agejax.configs import base_config, parse_arg, tiny_vgg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, res=32, quick=False, tiny=False)
  c = base_config()
  c.title = "Demo: few-shot learning curve on synthetic images"
  c.data.update(name="synthetic", resize=a.res + a.res // 4, crop=a.res, pool_size=300, test_size=200, skew=0.0)
  c.model.head = "regression"
  c.model.init_age = 40.0
  c.model.preprocess = dict(channel_order="RGB", scale=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                            resize=c.data.resize, crop=a.res)
  model = tiny_vgg()
  model["head"] = "regression"
  uniform = ((".*", 1.0, 1.0),)
  c.optim = ml_collections.ConfigDict(dict(name="adam", base_lr=2e-3, gamma=0.1, rules=uniform))
  pretrain = dict(data=dict(name="synthetic", pool_size=2000, test_size=200, skew=0.8), steps=60 if a.quick else 500,
                  stepsize=400, batch_size=16, optim=dict(name="adam", base_lr=3e-3, gamma=0.1, rules=uniform))
  c.priors = [dict(name="scratch", model=model, head="new"),
              dict(name="pretrained", model=model, pretrain=pretrain)]
  # (n, trials, stepsize, max_iter): steps grow with n like the paper's solver table.
  c.sizes = [(3, 32, 10, 15), (12, 16, 20, 30), (48, 8, 40, 60), (300, 2, 100, 150)]
  if a.quick:  # CI-sized: fewer trials
    c.sizes = [(n, min(t, 4), s, m) for n, t, s, m in c.sizes]
  c.steps_scale = 0.25 if a.quick else 1.0
  c.min_steps = 4
  c.trials.chunk_steps = 20
  c.eval_batch_size = 100
  if a.tiny:  # the scratch prior alone, a narrower network, a small pool: for tests of the trial engine
    c.data.update(pool_size=60, test_size=40)
    c.priors = [dict(name="scratch", model=dict(tiny_vgg(width=1 / 32, fc_dim=16), head="regression"), head="new")]
    c.sizes = [(3, 4, 4, 6), (6, 4, 4, 6)]
    c.steps_scale, c.min_steps = 1.0, 1
    c.trials.update(parallel="vmap", conv_impl="lax", chunk_steps=2)
    c.eval_size_zero, c.diagnostics, c.log_trial_losses = False, False, False
    c.eval_batch_size = 40
  return c
