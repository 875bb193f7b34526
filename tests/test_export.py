"""python -m agejax.export: the ONNX graph (preprocessing, network, age and SD) equals load_pretrained's ages."""

import json
import os

import jax
import numpy as np
import onnx
import pytest
from fake_weights import random_variables

pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx: pip install --no-deps -r requirements-export.txt")
pytest.importorskip("onnxruntime", reason="the exported graphs are checked with onnxruntime (requirements-port.txt)")

from agejax import export as E  # noqa: E402
from agejax.models import BACKBONES, Preprocess, build_model, load_pretrained, save_pretrained  # noqa: E402
from agejax.predict import age_decoder  # noqa: E402

# arch -> (backbone kwargs of a tiny model, input size, head fields, preprocess). Tiny widths; Lite0 also with
# one block per stage (jax2onnx's transpose pass grows with the square of the graph's size: ~15 s for 16 blocks).
TINY = {
    "vgg16": ({"width": 1 / 32, "fc_dim": 32}, 32, {}, Preprocess("BGR", 255.0, (104.0, 117.0, 123.0), resize=32,
                                                                  crop=32)),
    "mobilenet_v2": ({"width": 1 / 8}, 32, {}, Preprocess("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                                          resize=36, crop=32)),
    "efficientnet_lite0": ({"width": 1 / 8, "depth_mult": 0.34}, 32, {"head": "regression"},
                           Preprocess("RGB", 255.0, (127.0,) * 3, (128.0,) * 3, resize=32, crop=32)),
    "wrn16_8": ({"depth": 10, "widen_factor": 1}, 32, {}, Preprocess("BGR", 255.0, resize=32, crop=32)),
    "dlib_resnet10": ({"width": 1 / 8}, 64, {"num_classes": 81, "bin_values": [0.25] + list(range(1, 81))},
                      Preprocess("RGB", 255.0, (122.782, 117.001, 104.298), resize=64, crop=64)),
}


def make_prior(directory, arch: str) -> str:
  backbone, size, head, pre = TINY[arch]
  spec = {"arch": arch, "head": "dex", "backbone": backbone} | head
  rng = np.random.default_rng(1)
  model = build_model(spec)
  variables = random_variables(model, size)
  if "batch_stats" in variables:  # non-trivial running statistics, so the exported BatchNorm is really tested
    variables["batch_stats"] = jax.tree.map(
        lambda a: a + 0.2 * np.abs(rng.standard_normal(a.shape)).astype(np.float32), variables["batch_stats"])
  # Scale the head's first kernel to the features, so the logits are neither flat nor saturated.
  feats = jax.jit(lambda v, x: model.apply(v, pre(x), method=lambda m, x: m.backbone(x, train=False)))(
      variables, sample_images(pre.crop))
  first = "fc" if "fc" in variables["params"]["head"] else "fc1"
  variables["params"]["head"][first]["kernel"] *= 2.0 / float(np.std(feats))
  save_pretrained(str(directory), spec, variables, pre)
  return str(directory)


def sample_images(crop: int) -> np.ndarray:
  """Noise of three contrasts: the tiny random networks tell them apart."""
  rng = np.random.default_rng(0)
  return (rng.random((3, crop, crop, 3)) * np.array([60, 150, 255])[:, None, None, None]).astype(np.uint8)


def reference(prior: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  from agejax.models.pretrained import read_prior_metadata
  model, variables, pre = load_pretrained(prior)
  decode = age_decoder(read_prior_metadata(prior)["model"])
  age, sd = jax.jit(lambda v, x: decode(model.apply(v, pre(x), train=False)))(variables, images)
  return np.asarray(age), None if sd is None else np.asarray(sd)


@pytest.mark.parametrize("arch", list(TINY))
def test_onnx_matches_load_pretrained(arch, tmp_path):
  if arch not in BACKBONES:
    pytest.skip(f"architecture {arch} is not registered in this checkout")
  prior = make_prior(tmp_path / "prior", arch)
  out = str(tmp_path / "age.onnx")
  info = E.export_onnx(prior, out)
  crop = TINY[arch][3].crop
  images = sample_images(crop)
  age, sd = reference(prior, images)
  assert np.ptp(age) > 0.5, age  # the images get different ages
  got = E.onnx_ages(out, images)
  assert list(got) == info["outputs"] == (["age"] if sd is None else ["age", "age_sd"])
  np.testing.assert_allclose(got["age"], age, atol=1e-4, rtol=0)
  if sd is not None:
    np.testing.assert_allclose(got["age_sd"], sd, atol=1e-4, rtol=0)
  # Dynamic batch: one image alone gives its age in the batch.
  np.testing.assert_allclose(E.onnx_ages(out, images[1:2])["age"], age[1:2], atol=1e-4, rtol=0)
  graph = onnx.load(out)
  assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
  meta = json.loads({p.key: p.value for p in graph.metadata_props}["agejax_prior"])
  assert meta["model"]["arch"] == arch and meta["preprocess"]["crop"] == crop


def test_cli(tmp_path, capsys):
  prior = make_prior(tmp_path / "prior", "vgg16")
  out = tmp_path / "m.onnx"
  assert E.main(["--checkpoint", prior, "--format", "onnx", str(out)]) == 0
  assert "outputs age, age_sd" in capsys.readouterr().out and os.path.getsize(out) > 0
  assert E.main(["--checkpoint", prior, str(out)]) == 1
  assert "exists" in capsys.readouterr().err
  assert E.main(["--checkpoint", str(tmp_path), str(tmp_path / "x.onnx")]) == 1
  assert "not an agejax prior" in capsys.readouterr().err
