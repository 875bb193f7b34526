"""Convert a public checkpoint into an agejax prior directory.

  python -m agejax.port --format torchvision --arch vgg16 vgg16-397923af.pth priors/imagenet_vgg16
  python -m agejax.port --format caffe --arch vgg16 dex_imdb_wiki.caffemodel priors/dex_imdb_wiki
  python -m agejax.port --format keras --arch wrn16_8 weights.28-3.73.hdf5 priors/wrn
  python -m agejax.port --format onnx --arch dlib_resnet10 age-v1.onnx priors/dlib

Formats: torchvision (.pth), keras (legacy .h5; full-model files with model_config for wrn16_8), caffe
(.caffemodel), vggface-dag (vgg_face_dag.pth), efficientnet-lite (the efficientnet_lite_pytorch layout),
onnx (read with the onnx package; dlib_resnet10). The prior keeps the checkpoint's own age or class head;
a config decides whether to keep it or put a new head on it. OUT must not exist yet (an empty directory is
fine), or pass --force to replace it.
"""

import argparse
import hashlib
import importlib
import os
import shutil
import sys
from collections.abc import Sequence

from agejax.cli import run_command
from agejax.errors import AgejaxError
from agejax.models.pretrained import save_pretrained

FORMATS = ("torchvision", "keras", "caffe", "vggface-dag", "efficientnet-lite", "onnx")

# Architecture family -> converter module exposing `convert(fmt, src, arch, **options)` returning
# (model spec, variables, Preprocess) or (spec, variables, Preprocess, extras); extras may hold
# 'face_crop', 'extra_heads' (see save_pretrained) and 'source' (merged into the source metadata).
FAMILIES = {
    "vgg16": "agejax.porting.vgg",
    "mobilenet_v2": "agejax.porting.mobilenet",
    "efficientnet": "agejax.porting.efficientnet",
    "wrn16_8": "agejax.porting.wideresnet",
    "dlib_resnet10": "agejax.porting.dlib",
}
# Families whose converters take `keep_heads` (the others have only their one head).
MULTI_HEAD = ("wrn16_8",)
ARCH_HELP = "vgg16, mobilenet_v2, efficientnet_b0..b7, efficientnet_lite0..4, wrn16_8, dlib_resnet10"


def family_of(arch: str) -> str:
  return "efficientnet" if arch.startswith("efficientnet") else arch


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def check_out(out: str, force: bool) -> None:
  """Refuses to write to an OUT that exists unless `force`; an empty directory holds nothing to lose and is used."""
  if not os.path.lexists(out) or force or (os.path.isdir(out) and not os.listdir(out)):
    return
  raise AgejaxError(f"{out} already exists; choose a new prior directory or pass --force to overwrite it")


def port(fmt: str, src: str, out: str, arch: str, keep_heads: Sequence[str] = ("age",), force: bool = False,
         **options) -> dict:
  """Converts `src` and writes the prior directory `out`; returns its model spec."""
  if fmt not in FORMATS:
    raise AgejaxError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
  family = family_of(arch)
  if family not in FAMILIES:
    raise AgejaxError(f"unknown arch {arch!r}; expected {ARCH_HELP}")
  keep_heads = tuple(keep_heads)
  if family in MULTI_HEAD:
    options["keep_heads"] = keep_heads
  elif keep_heads != ("age",):
    raise AgejaxError(f"--keep-heads {','.join(keep_heads)}: {arch} checkpoints have one head; only "
                      f"{', '.join(MULTI_HEAD)} has others")
  check_out(out, force)
  converter = importlib.import_module(FAMILIES[family])
  spec, variables, preprocess, *rest = converter.convert(fmt, src, arch, **options)
  extras = rest[0] if rest else {}
  source = {"format": fmt, "file": src, "sha256": sha256_of(src), **extras.get("source", {})}
  if force and os.path.lexists(out):
    shutil.rmtree(out) if os.path.isdir(out) and not os.path.islink(out) else os.remove(out)
  save_pretrained(out, spec, variables, preprocess, source=source, face_crop=extras.get("face_crop"),
                  extra_heads=extras.get("extra_heads"))
  return spec


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m agejax.port", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--arch", required=True, help=ARCH_HELP)
  p.add_argument("--keep-heads", default="age",
                 help="comma list of the checkpoint's heads to keep: 'age' (default) or 'age,gender' (wrn16_8: "
                      "the gender softmax is stored beside the model in extra_heads.npz; the model has one age head)")
  p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
  p.add_argument("src", help="checkpoint file")
  p.add_argument("out", help="prior directory to write (must not exist unless --force)")
  args = p.parse_args(argv)
  keep = tuple(h.strip() for h in args.keep_heads.split(",") if h.strip())

  def action() -> str:
    spec = port(args.format, args.src, args.out, args.arch, keep_heads=keep, force=args.force)
    return f"wrote prior {args.out}: arch={spec['arch']} head={spec.get('head')} classes={spec.get('num_classes')}"

  return run_command(action, errors=(AgejaxError, FileNotFoundError))


if __name__ == "__main__":
  sys.exit(main())
