"""VGG-16 ports give the same logits as the reference implementations (real file formats, random weights)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # must precede the first keras import

import h5py
import numpy as np
import pytest
from PIL import Image

from agejax.models.pretrained import KERAS_CAFFE_BGR, TORCHVISION_RGB, VGGFACE_RGB, load_pretrained
from agejax.models.registry import build_model
from agejax.port import port
from agejax.porting import vgg
from agejax.porting.keras_io import read_h5_weights

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

UTKFACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "UTKFace")


def photos() -> np.ndarray:
  """Two real 224x224 RGB faces (UTKFace when present, else scikit-image samples)."""
  if os.path.isdir(UTKFACE):
    names = sorted(os.listdir(UTKFACE))[:2]
    images = [Image.open(os.path.join(UTKFACE, n)).convert("RGB") for n in names]
  else:
    from skimage import data
    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]
  return np.stack([np.asarray(im.resize((224, 224), Image.BILINEAR)) for im in images])


def reference_vgg16(seed: int = 0) -> "torch.nn.Module":
  """torchvision VGG-16 with seeded random weights and non-zero biases (so a bias mix-up shows)."""
  torch.manual_seed(seed)
  model = torchvision.models.vgg16()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.05)
  return model.eval()


def torch_forward(fn, x_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return fn(torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))).numpy()


def assert_logits_match(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  scale = np.abs(ref).max()
  assert scale > 1e-2, "reference logits are degenerate; the comparison would prove nothing"
  assert np.abs(ref[0] - ref[1]).max() > 1e-3 * scale, "the two photos give the same logits"
  assert np.abs(ours - ref).max() <= rtol * scale, f"max diff {np.abs(ours - ref).max()} vs scale {scale}"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  return photos()


@pytest.fixture(scope="module")
def reference() -> "torch.nn.Module":
  return reference_vgg16()


def test_torchvision_port_matches_torchvision(reference, images, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tv")
  src = str(tmp / "vgg16.pth")
  torch.save(reference.state_dict(), src)
  spec = port("torchvision", src, str(tmp / "prior"), "vgg16")
  os.remove(src)
  model, variables, pre = load_pretrained(str(tmp / "prior"))
  assert spec == {"arch": "vgg16", "head": "classes", "num_classes": 1000, "backbone": {}}
  assert pre == TORCHVISION_RGB
  x = np.asarray(pre(images))
  assert_logits_match(model.apply(variables, x), torch_forward(reference, x))


def test_vggface_dag_port_matches_torch(reference, images, tmp_path):
  rng = np.random.default_rng(1)
  tv = reference.state_dict()
  names = {c: f"features.{i}" for c, i in zip(vgg.CONV_NAMES, vgg.TORCHVISION_CONV_INDICES, strict=True)}
  names |= {"fc6": "classifier.0", "fc7": "classifier.3"}
  state = {f"{ours}.{p}": tv[f"{theirs}.{p}"] for ours, theirs in names.items() for p in ("weight", "bias")}
  fc8_w = torch.from_numpy(rng.normal(0, 0.01, (2622, 4096)).astype(np.float32))
  fc8_b = torch.from_numpy(rng.normal(0, 0.05, 2622).astype(np.float32))
  state |= {"fc8.weight": fc8_w, "fc8.bias": fc8_b}
  src = str(tmp_path / "vgg_face_dag.pth")
  torch.save(state, src)
  spec, variables, pre = vgg.convert("vggface-dag", src, "vgg16")
  os.remove(src)
  assert spec["num_classes"] == 2622 and spec["head"] == "classes"
  assert pre == VGGFACE_RGB
  model = build_model(spec)

  def vgg_face(t):  # the VGG-Face graph: torchvision's VGG-16 up to fc7, then fc8 with 2622 outputs
    feats = reference.classifier[:6](torch.flatten(reference.avgpool(reference.features(t)), 1))
    return torch.nn.functional.linear(feats, fc8_w, fc8_b)

  x = np.asarray(pre(images))
  assert_logits_match(model.apply(variables, x), torch_forward(vgg_face, x))


def _text(n) -> str:
  return n.decode() if isinstance(n, bytes) else str(n)


def _rename_h5_weights(src: str, dst: str, rename) -> None:
  """Copies a Keras weights file, renaming every weight with `rename(layer, short_name)`."""
  with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
    for key, value in fin.attrs.items():
      fout.attrs[key] = value
    for layer in map(_text, fin.attrs["layer_names"]):
      g_in, g_out = fin[layer], fout.create_group(layer)
      new_names = []
      for old in map(_text, g_in.attrs["weight_names"]):
        new = rename(layer, old.split("/")[-1])
        g_out.create_dataset(new, data=g_in[old][()])
        new_names.append(new.encode())
      g_out.attrs["weight_names"] = new_names


def keras2_name(layer: str, weight: str) -> str:
  return f"{layer}/{weight}:0"


def keras1_name(layer: str, weight: str) -> str:
  return f"{layer}_{ {'kernel': 'W', 'bias': 'b'}[weight]}_1:0"


def test_keras_port_matches_keras_for_keras3_2_and_1_names(images, tmp_path):
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("keras was imported with another backend before KERAS_BACKEND=jax was set")
  from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group
  keras.utils.set_random_seed(0)
  model = keras.applications.VGG16(weights=None, classifier_activation=None)  # logits, not softmax
  rng = np.random.default_rng(2)
  for layer in model.layers:
    if layer.get_weights():
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.05, bias.shape).astype(np.float32)])
  x = np.asarray(KERAS_CAFFE_BGR(images))
  np.testing.assert_allclose(x, keras.applications.vgg16.preprocess_input(images.astype(np.float32)), atol=1e-4)
  ref = np.asarray(model.predict(x, verbose=0))
  variants = {"keras3": str(tmp_path / "keras3.h5"), "keras2": str(tmp_path / "keras2.h5"),
              "keras1": str(tmp_path / "keras1.h5")}
  with h5py.File(variants["keras3"], "w") as f:
    save_weights_to_hdf5_group(f, model)
  del model
  _rename_h5_weights(variants["keras3"], variants["keras2"], keras2_name)
  _rename_h5_weights(variants["keras3"], variants["keras1"], keras1_name)
  spec, variables, pre = vgg.convert("keras", variants["keras3"], "vgg16")
  assert pre == KERAS_CAFFE_BGR
  assert spec["num_classes"] == 1000
  assert_logits_match(build_model(spec).apply(variables, x), ref)
  # The converter sees only read_h5_weights' output, so identical output means identical logits.
  keras3 = read_h5_weights(variants["keras3"])
  assert len(keras3) == 16 and [n for n, _ in keras3["block1_conv1"]] == ["kernel", "bias"]
  for name in ("keras2", "keras1"):
    other = read_h5_weights(variants[name])
    assert list(other) == list(keras3), name
    for layer, weights in keras3.items():
      assert [n for n, _ in other[layer]] == [n for n, _ in weights], (name, layer)
      for (_, a), (_, b) in zip(other[layer], weights, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} {layer}")


def test_read_h5_weights_full_model_file_with_chunked_layer_names(tmp_path):
  path = str(tmp_path / "model.h5")
  rng = np.random.default_rng(3)
  conv, bn = rng.normal(size=(3, 3, 2, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights")
    root.attrs["layer_names0"] = [b"conv", b"relu"]
    root.attrs["layer_names1"] = [b"bn"]
    root.create_group("relu").attrs["weight_names"] = []
    g = root.create_group("conv")
    g.attrs["weight_names"] = [b"conv/kernel:0"]
    g["conv/kernel:0"] = conv
    g = root.create_group("bn")
    g.attrs["weight_names0"] = [b"bn_gamma_1:0", b"bn_running_std_1:0"]
    g["bn_gamma_1:0"], g["bn_running_std_1:0"] = bn, bn * 2
  layers = read_h5_weights(path)
  assert list(layers) == ["conv", "bn"]
  assert [n for n, _ in layers["bn"]] == ["gamma", "moving_variance"]
  np.testing.assert_array_equal(layers["conv"][0][1], conv)
  np.testing.assert_array_equal(layers["bn"][1][1], bn * 2)
