"""The report's transfer study (docs/protocol.md; report Table 2): IMDB faces, frozen vs full fine-tuning.

The IMDB part of IMDB-WIKI, cleaned as the report did: no face or a second face dropped, `face_score` below
1.0 dropped, ages outside 0..100 dropped (agejax's imdb_wiki reader options); half of what remains (35,934
images, a seeded random subset) split 21,568 train / 7,183 val / 7,183 test. Images resized to 256x256, random
horizontal flip. Backbones: MobileNetV2 and EfficientNet-B3 with torchvision's ImageNet-1k weights, each with
a three-layer GELU regression head, trained (1) with the backbone frozen and (2) entirely. Adam with a
step-decayed learning rate, MAE loss, validation every epoch, best epoch kept; test MAE, PLCC, SROCC.

  python -m agejax.port --format torchvision --arch mobilenet_v2 mobilenet_v2-7ebf99e0.pth priors/mobilenet_v2
  python -m agejax.port --format torchvision --arch efficientnet_b3 efficientnet_b3_rwightman-b3899882.pth \\
      priors/effb3
  python -m agejax.main --config configs/imdb_transfer.py:mobilenet_v2=priors/mobilenet_v2,effb3=priors/effb3 \\
      --workdir runs/imdb_transfer --config.data.root=/data/imdb_crop   # or the imdb=/data/imdb_crop argument
"""

import ml_collections

from agejax.configs import parse_arg, transfer_config

# The report's split of the cleaned IMDB images (half of ~72k): train / val / test.
REPORT_SPLIT = (21568, 7183, 7183)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, mobilenet_v2="", effb3="", imdb="")
  c = transfer_config()
  c.title = "IMDB: transfer learning of ImageNet backbones (report Table 2)"
  train, val, test = REPORT_SPLIT
  c.data.update(name="imdb_wiki", root=a.imdb, resize=256, crop=256, mirror=True, random_crop=False,
                max_records=train + val + test, test_size=test, val_size=val, train_size=train,
                reader_options=dict(face_score_min=1.0, require_single_face=True, min_age=0, max_age=100))
  c.backbones = [dict(name=name, dir=path) for name, path in (("MobileNet_V2", a.mobilenet_v2),
                                                              ("EfficientNet_B3", a.effb3)) if path]
  c.model.init_age = 36.0  # about the IMDB mean age; the head starts at a plausible age
  c.epochs = 10
  c.lr_decay_epochs = 4
  c.batch_size = 32
  return c
