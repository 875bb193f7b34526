"""The few-shot learning curve on REAL faces: UTKFace (23,707 aligned 200x200 crops, real ages).

Exact duplicates are grouped before splitting, so no copy of a test image is in the training pool
(UTKFace has 375 groups of byte-identical files). A seeded test set of `test_size` images is fixed;
sizes go from 3 up to `max_size` images with the paper's solver scaling (stepsize ~ n, max_iter ~ 5n)
and trial counts (32 at the smallest sizes, halving as the size doubles).

Priors: `lite0=DIR` adds the real EfficientNet-Lite0 ImageNet checkpoint (port it first; README),
with a new 101-way DEX head; the tiny VGG-16 from scratch is always there as the no-prior baseline.

  python -m agejax.main --config configs/utkface.py:runlocal --workdir /tmp/utk_local
  python -m agejax.main --config configs/utkface.py:lite0=priors/lite0 --workdir /tmp/utk \\
      --config.data.root=/path/to/UTKFace
"""

import os

import ml_collections

from agejax.configs import SHARED_DATA, base_config, parse_arg, scaled_sizes, tiny_vgg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, runlocal=False, lite0="", res=0, max_size=0, scratch=True)
  c = base_config()
  c.title = "Few-shot learning curve on UTKFace (real faces)"
  res = a.res or (64 if a.runlocal else 224)
  c.data.update(name="utkface", root=os.path.join(SHARED_DATA, "UTKFace"), resize=res * 8 // 7, crop=res,
                test_size=500 if a.runlocal else 2000, dedupe=True)
  max_size = a.max_size or (768 if a.runlocal else 16384)
  sizes = [3, 6, 12, 24, 48, 96, 192, 384, 768, 1536, 3072, 6144, 12288, 16384]
  c.sizes = scaled_sizes([n for n in sizes if n <= max_size])
  c.priors = []
  if a.scratch:
    # A from-scratch prior: regression head and Adam learn from few images where DEX bins cannot.
    c.priors.append(dict(name="scratch-vgg", model=tiny_vgg(width=1 / 8, fc_dim=128) | {"head": "regression"},
                         head="new"))
  if a.lite0:
    c.priors.append(dict(name="imagenet-lite0", dir=a.lite0, head="new", backbone_overrides=dict(bn_train=False)))
  c.model.head = "regression"
  c.model.init_age = 33.0  # about the UTKFace mean; the head starts at a plausible age
  c.model.preprocess = dict(channel_order="RGB", scale=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                            resize=c.data.resize, crop=res)
  c.optim = ml_collections.ConfigDict(dict(name="adam", base_lr=1e-3, gamma=0.1, rules=((".*", 1.0, 1.0),)))
  if a.runlocal:
    c.steps_scale = 0.5
    c.min_steps = 20
  c.trials.chunk_steps = 15
  c.eval_batch_size = 250
  return c
