"""Convert a public checkpoint into an agejax prior directory.

  python -m agejax.port --format torchvision --arch vgg16 vgg16-397923af.pth priors/imagenet_vgg16
  python -m agejax.port --format caffe --arch vgg16 dex_imdb_wiki.caffemodel priors/dex_imdb_wiki

Formats: torchvision (.pth), keras (legacy .h5), caffe (.caffemodel), vggface-dag (vgg_face_dag.pth),
efficientnet-lite (the efficientnet_lite_pytorch layout). The prior keeps the checkpoint's own head;
a config decides whether to keep it or put a new 101-way head on it.
"""

import argparse
import hashlib
import importlib
import sys

from agejax.errors import AgejaxError
from agejax.models.pretrained import save_pretrained

FORMATS = ("torchvision", "keras", "caffe", "vggface-dag", "efficientnet-lite")

# Architecture family -> converter module exposing `convert(fmt, src, arch, **options)`
# returning (model spec, variables, Preprocess).
FAMILIES = {
    "vgg16": "agejax.porting.vgg",
    "mobilenet_v2": "agejax.porting.mobilenet",
    "efficientnet": "agejax.porting.efficientnet",
}


def family_of(arch: str) -> str:
  return "efficientnet" if arch.startswith("efficientnet") else arch


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def port(fmt: str, src: str, out: str, arch: str, **options) -> dict:
  """Converts `src` and writes the prior directory `out`; returns its model spec."""
  if fmt not in FORMATS:
    raise AgejaxError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
  family = family_of(arch)
  if family not in FAMILIES:
    raise AgejaxError(f"unknown arch {arch!r}; expected vgg16, mobilenet_v2, efficientnet_b0..b7 or lite0..lite4")
  converter = importlib.import_module(FAMILIES[family])
  spec, variables, preprocess = converter.convert(fmt, src, arch, **options)
  source = {"format": fmt, "file": src, "sha256": sha256_of(src)}
  save_pretrained(out, spec, variables, preprocess, source=source)
  return spec


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m agejax.port", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--arch", required=True, help="vgg16, mobilenet_v2, efficientnet_b0..b7, efficientnet_lite0..4")
  p.add_argument("src", help="checkpoint file")
  p.add_argument("out", help="prior directory to write")
  args = p.parse_args(argv)
  try:
    spec = port(args.format, args.src, args.out, args.arch)
  except (AgejaxError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote prior {args.out}: arch={spec['arch']} head={spec.get('head')} "
        f"classes={spec.get('num_classes')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
