"""Predict ages for images with a saved model (a trial checkpoint or any age prior directory).

  python -m agejax.predict --checkpoint WORKDIR/checkpoints/scratch/n00300_best face1.jpg face2.jpg

Each image is resized to the prior's `resize` (squashed to a square, as in training), centre-cropped to
its `crop`, preprocessed for the prior, and the head's age is printed as `path<TAB>age`.
"""

import argparse
import sys
from collections.abc import Sequence

import jax
import numpy as np

from agejax.errors import AgejaxError


def predict_ages(checkpoint: str, paths: Sequence[str], batch_size: int = 32) -> np.ndarray:
  """Predicted ages (years) of image files with the model saved in `checkpoint`."""
  from agejax.data.images import center_crop, decode_image, resize_image
  from agejax.models import load_pretrained, predict_age
  from agejax.models.pretrained import read_prior_metadata

  head = read_prior_metadata(checkpoint)["model"].get("head")
  if head not in ("dex", "regression"):
    raise AgejaxError(f"{checkpoint}: its {head!r} head does not predict age (fine-tune it with a 'dex' or "
                      "'regression' head first)")
  model, variables, preprocess = load_pretrained(checkpoint)
  apply = jax.jit(lambda v, x: predict_age(model.apply(v, preprocess(x), train=False), head))
  out = []
  for start in range(0, len(paths), batch_size):
    batch = [center_crop(resize_image(decode_image(p), preprocess.resize), preprocess.crop)
             for p in paths[start:start + batch_size]]
    out.append(np.asarray(apply(variables, np.stack(batch))))
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m agejax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a prior directory (e.g. WORKDIR/checkpoints/PRIOR/n00003_best)")
  p.add_argument("images", nargs="+")
  p.add_argument("--batch-size", type=int, default=32)
  args = p.parse_args(argv)
  try:
    ages = predict_ages(args.checkpoint, args.images, args.batch_size)
  except AgejaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for path, age in zip(args.images, ages):
    print(f"{path}\t{age:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
