"""The few-shot learning curve on REAL faces: UTKFace (23,707 aligned 200x200 crops, real ages), from real
age priors, with the paper's protocol.

The protocol (docs/protocol.md section 3): LAP's sizes, trial counts (32 up to 12 images, halving after) and
per-size solver (stepsize, max_iter), drawn from a pool of LAP's 1,981 images; Caffe SGD at lr 1e-4, momentum
0.9, the age layer at 10x, the prior's own DEX head kept. Exact duplicates are grouped before splitting, so no
copy of a test image is in the pool. A seeded test set of `test_size` images is fixed.

Priors (port them first with agejax.port; README "Real age priors"):
  wrn=DIR    yu4u's IMDB-WIKI WideResNet-16-8 (101 DEX bins, 64 px, BGR); UTKFace chips are much tighter than
             its training crops, so its images are padded by 40% per side (mirrored border) first.
  dlib=DIR   dlib's age ResNet-10 (81 bins, 64 px), trained on chips like UTKFace's: no padding.
  lite0=DIR  the ImageNet EfficientNet-Lite0 with a new regression head (an ImageNet baseline; at runlocal its
             backbone is frozen and cached, a linear probe).
  scratch    the tiny VGG-16 from scratch with a regression head (the no-prior baseline; scratch=False drops it).
Each real prior runs twice: `PRIOR-paper` (the paper's solver on the whole network) and `PRIOR-tuned` (the
setting docs/real_priors.md found best for it; `paper=False` / `tuned=False` drop either).

`:untouched` evaluates each real prior without fine-tuning (size 0 only) with its chips padded by 0, 20% and 40%
per side, to find its crop convention.

`:runlocal` fits 2 CPU cores in about 30 min: sizes up to 49 images, half the paper's steps per size, a pool
of 600 and a test set of 300 images; the WRN (~12 GFLOP a forward) trains its head only there, on backbone
features computed once (`freeze='backbone'`), since its full network runs at a few images/s on a CPU. `:full`
is the paper's grid (sizes up to 1,981) for an accelerator, every `-paper` prior on its whole network.

  python -m agejax.main --config configs/utkface.py:runlocal,wrn=priors/wrn,dlib=priors/dlib,lite0=priors/lite0 \\
      --workdir runs/utk_real
  python -m agejax.main --config configs/utkface.py:full,wrn=priors/wrn,dlib=priors/dlib --workdir runs/utk_full
  python -m agejax.main --config configs/utkface.py:untouched,wrn=priors/wrn,dlib=priors/dlib --workdir runs/utk_size0
"""

import os
from typing import Any

import ml_collections

from agejax.configs import (
  PAPER_POOLS,
  SHARED_DATA,
  base_config,
  lap_protocol_sizes,
  paper_solver,
  parse_arg,
  tiny_vgg,
)

# The crop convention of each real prior (agejax.data.images.adapt_crop, applied before the resize).
WRN_VIEW = dict(pad_fraction=0.4, pad_mode="reflect")
DLIB_VIEW = dict(pad_fraction=0.0)


def real_face_priors(a: Any, full: bool) -> list[dict[str, Any]]:
  """The prior entries of the real-face study for parsed arguments `a` (wrn/dlib/lite0 dirs, scratch, paper,
  tuned). Shared with configs/custom.py, which runs the same study on a user's CSV."""
  priors = []
  if a.scratch:
    priors.append(dict(name="scratch-vgg", model=tiny_vgg(width=1 / 8, fc_dim=128) | {"head": "regression"},
                       head="new"))
  if a.lite0:  # on a CPU a linear probe of the ImageNet features (cached), the whole network on an accelerator
    priors.append(dict(name="imagenet-lite0", dir=a.lite0, head="new", backbone_overrides=dict(bn_train=False),
                       freeze="none" if full else "backbone"))
  for name, path, view in (("wrn", a.wrn, WRN_VIEW), ("dlib", a.dlib, DLIB_VIEW)):
    if not path:
      continue
    kept = dict(dir=path, head="keep", backbone_overrides=dict(bn_train=False), data=dict(view))
    if a.paper:
      # On a CPU the WRN's whole network is out of reach: its paper protocol trains the kept head there.
      freeze = "backbone" if name == "wrn" and not full else "none"
      priors.append(kept | dict(name=f"{name}-paper", optim=paper_solver(1e-4), freeze=freeze))
    if a.tuned:
      priors.append(kept | dict(name=f"{name}-tuned", **TUNED[name]))
  return priors


UNTOUCHED_PADS = (0.0, 0.2, 0.4)  # the crop conventions `:untouched` compares (pad per side, mirrored border)

# The settings docs/real_priors.md measured as best per prior, on cached backbone features. Both wrap the kept head
# in an output calibration, scale (a - 33) + 33 + shift of its expected age a (heads.CalibratedHead), starting as
# the identity. WRN: the calibration at Adam 3e-3 and the head itself at Adam 1e-4 (runlocal, 49 images: 7.05
# against 8.03 for the head alone and 7.99 for the calibration alone). dlib: the calibration alone at Adam 3e-4;
# every setting that trains its head or deeper left it at or above its untouched MAE, up to 594 images, and only
# the calibration falls steadily, by 0.05 years at 49 (docs/real_priors.md, "dlib: why fine-tuning gains so
# little over the untouched net").
CALIBRATION_ONLY = ((r"^head/inner/", 0.0, 0.0), (".*", 1.0, 1.0))  # the kept head frozen inside CalibratedHead
CALIBRATION_AND_HEAD = ((r"^head/(scale|shift)$", 30.0, 1.0), (".*", 1.0, 1.0))  # the calibration at 30x the lr


def adam_solver(base_lr: float, rules: tuple) -> dict[str, Any]:
  """Adam at a constant learning rate, no weight decay, lr multipliers from `rules`."""
  return dict(name="adam", base_lr=base_lr, gamma=1.0, weight_decay=0.0, rules=rules)


TUNED = {
    "wrn": dict(freeze="backbone", head_options=dict(calibrate=33.0), optim=adam_solver(1e-4, CALIBRATION_AND_HEAD)),
    "dlib": dict(freeze="backbone", head_options=dict(calibrate=33.0), optim=adam_solver(3e-4, CALIBRATION_ONLY)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, runlocal=False, full=False, lite0="", wrn="", dlib="", res=0, max_size=0, scratch=True,
                paper=True, tuned=True, untouched=False)
  c = base_config()
  c.title = "Few-shot learning curve on UTKFace (real faces, real age priors)"
  res = a.res or 64  # both real age priors take 64 px
  if a.wrn and res != 64:
    raise ValueError(f"the wrn prior takes 64 px input (its head reads 16x16x512 features), not res={res}")
  c.data.update(name="utkface", root=os.path.join(SHARED_DATA, "UTKFace"), resize=res, crop=res,
                random_crop=False, test_size=300 if a.runlocal else 2000, dedupe=True,
                pool_limit=600 if a.runlocal else PAPER_POOLS["lap"])
  c.sizes = lap_protocol_sizes(a.max_size or (49 if a.runlocal else 0))
  c.priors = real_face_priors(a, full=not a.runlocal)
  if a.untouched:  # size 0 only: each real prior untouched under several crop conventions
    c.sizes = ()
    c.priors = [dict(name=f"{name}-pad{pad:g}", dir=path, head="keep", data=dict(pad_fraction=pad, pad_mode="reflect"))
                for name, path in (("wrn", a.wrn), ("dlib", a.dlib)) if path for pad in UNTOUCHED_PADS]
  # The baselines' new regression heads (the real priors carry their own solver).
  c.model.head = "regression"
  c.model.init_age = 33.0  # about the UTKFace mean; the head starts at a plausible age
  c.model.preprocess = dict(channel_order="RGB", scale=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                            resize=res, crop=res)
  c.optim = ml_collections.ConfigDict(dict(name="adam", base_lr=1e-3, gamma=0.1, rules=((".*", 1.0, 1.0),)))
  if a.runlocal:
    c.steps_scale = 0.5
    c.min_steps = 10
  c.trials.chunk_steps = 15
  # A fixed convolution implementation (fast on XLA:CPU, see README) instead of timing every layer of the WRN's
  # whole network for trials that train only its head.
  c.trials.conv_impl = "canonical"
  c.eval_batch_size = 150
  return c
