"""Export a prior or trial checkpoint as a self-contained ONNX model: preprocessing, network and age in one graph.

  python -m agejax.export --checkpoint WORKDIR/checkpoints/PRIOR/n00300_best --format onnx age.onnx

The graph takes `images`: uint8 RGB (B, crop, crop, 3), any batch size B, already cropped for the prior
(`agejax.data.faces.crop_face`, then the central crop x crop) and returns `age` (B,) in years, plus `age_sd`
(B,), the SD of the predicted age distribution, for heads that have one (DEX and the other binned heads). The
prior's metadata (preprocess, face_crop, model spec, source) is stored in the model's metadata_props as JSON
under `agejax_prior`. The converter is jax2onnx (PyPI); docs/faces.md says why and what it could not do.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax.cli import run_command
from agejax.errors import AgejaxError, CheckpointError

OPSET = 21
INPUT_NAME = "images"


@contextlib.contextmanager
def _keyword_pooling() -> Iterator[None]:
  """jax2onnx 0.17 replaces flax.linen.max_pool/avg_pool while it traces, with functions that take the window
  shape only as a keyword; our models pass it positionally (flax's own signature). This forwards positional
  calls to whatever is installed when the model is traced."""
  import flax.linen as nn
  import flax.linen.pooling as pooling

  saved = {(mod, name): getattr(mod, name) for mod in (nn, pooling) for name in ("max_pool", "avg_pool")}

  def adapter(current):
    def pool(inputs, window_shape, strides=None, padding="VALID", **kw):
      return current(inputs, window_shape=window_shape, strides=strides, padding=padding, **kw)
    return pool

  try:
    for (mod, name), _ in saved.items():
      setattr(mod, name, adapter(getattr(mod, name)))
    yield
  finally:
    for (mod, name), fn in saved.items():
      setattr(mod, name, fn)


def age_function(checkpoint: str) -> tuple[Any, dict[str, Any], list[str]]:
  """(fn, prior metadata, output names): fn maps uint8 images (B, crop, crop, 3) to (age,) or (age, age_sd)."""
  from agejax.models import load_pretrained
  from agejax.models.pretrained import read_prior_metadata
  from agejax.predict import age_decoder

  meta = read_prior_metadata(checkpoint)
  decode = age_decoder(meta["model"], checkpoint)
  model, variables, preprocess = load_pretrained(checkpoint)
  has_sd = decode.has_sd
  variables = jax.tree.map(jnp.asarray, variables)

  def fn(images):
    with _keyword_pooling():  # entered while jax2onnx traces, so it wraps jax2onnx's own pooling functions
      age, sd = decode(model.apply(variables, preprocess(images), train=False))
    return (age, sd) if has_sd else (age,)

  return fn, meta, ["age", "age_sd"] if has_sd else ["age"]


def export_onnx(checkpoint: str, out: str, opset: int = OPSET) -> dict[str, Any]:
  """Writes `out` (.onnx) for the prior in `checkpoint`; returns {inputs, outputs, crop, bytes}."""
  import onnx

  # jax2onnx imports its optional example plugins (equinox, dm_pix) and logs a traceback for each one missing.
  logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # "value type ... not known" notes on shape constants
  try:
    from jax2onnx import to_onnx
  except ImportError as e:
    raise AgejaxError(f"ONNX export needs jax2onnx ({e}): pip install --no-deps -r requirements-export.txt") from e

  fn, meta, names = age_function(checkpoint)
  crop = int(meta["preprocess"].get("crop", 224))
  spec = jax.ShapeDtypeStruct(("B", crop, crop, 3), jnp.uint8)
  try:
    proto = to_onnx(fn, [spec], model_name="agejax_age", opset=opset, input_names=[INPUT_NAME], output_names=names)
  except Exception as e:  # jax2onnx raises plain exceptions naming the primitive it cannot lower
    first = str(e).splitlines()[0] if str(e) else ""
    raise CheckpointError(f"{checkpoint}: jax2onnx cannot convert this model ({type(e).__name__}: {first})") from e
  entry = proto.metadata_props.add()
  entry.key, entry.value = "agejax_prior", json.dumps(meta, sort_keys=True)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"
  onnx.save_model(proto, tmp)
  os.replace(tmp, out)
  return {"inputs": [INPUT_NAME], "outputs": names, "crop": crop, "bytes": os.path.getsize(out)}


def onnx_ages(path: str, images: np.ndarray) -> dict[str, np.ndarray]:
  """Runs an exported model with onnxruntime on uint8 images (B, crop, crop, 3): {output name: array}."""
  import onnxruntime as ort

  opts = ort.SessionOptions()
  opts.log_severity_level = 3  # its shape-merge warnings on jax2onnx graphs are noise
  sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
  outs = sess.run(None, {INPUT_NAME: np.ascontiguousarray(images, np.uint8)})
  return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m agejax.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a prior directory (agejax_prior.json + variables/)")
  p.add_argument("--format", choices=["onnx"], default="onnx")
  p.add_argument("--opset", type=int, default=OPSET)
  p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
  p.add_argument("out", help="the file to write (e.g. age.onnx)")
  args = p.parse_args(argv)
  return run_command(lambda: _export(args.checkpoint, args.out, args.opset, args.force))


def _export(checkpoint: str, out: str, opset: int, force: bool) -> str:
  """Exports and describes what was written; an existing `out` without `force` is an error."""
  if os.path.exists(out) and not force:
    raise AgejaxError(f"{out} exists (use --force to overwrite)")
  info = export_onnx(checkpoint, out, opset)
  return (f"wrote {out} ({info['bytes'] / 1e6:.1f} MB): input {INPUT_NAME} uint8 (B, {info['crop']}, "
          f"{info['crop']}, 3) RGB, outputs {', '.join(info['outputs'])}")


if __name__ == "__main__":
  sys.exit(main())
