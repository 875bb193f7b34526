"""Caffe `.caffemodel` reading/writing and the Caffe VGG-16 port (DEX / VGG-Face layout) against torch."""

import os

import numpy as np
import pytest
from google.protobuf.internal.encoder import _VarintBytes

from agejax.models.pretrained import CAFFE_BGR
from agejax.models.registry import build_model
from agejax.porting import caffe, vgg
from agejax.porting.caffe_proto import TYPED

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

UTKFACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "UTKFace")


def small_layers(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
  return {"conv1_1": [rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)],
          "fc8-101": [rng.normal(size=(101, 7)).astype(np.float32), rng.normal(size=101).astype(np.float32)]}


@pytest.mark.parametrize("old_format", [False, True])
def test_caffemodel_round_trip_and_typed_description_agree(tmp_path, old_format):
  layers = small_layers(np.random.default_rng(0))
  path = str(tmp_path / "net.caffemodel")
  caffe.write_caffemodel(path, layers, old_format=old_format)
  got = caffe.read_caffemodel_layers(path)
  assert [(layer.name, layer.type) for layer in got] == [("conv1_1", "Convolution"), ("fc8-101", "InnerProduct")]
  if old_format:  # V1 blobs are 4-D: InnerProduct (1, 1, out, in), bias (1, 1, 1, out)
    assert got[1].blobs[0].shape == (1, 1, 101, 7) and got[1].blobs[1].shape == (1, 1, 1, 101)
  for layer in got:
    for blob, want in zip(layer.blobs, layers[layer.name], strict=True):
      np.testing.assert_array_equal(blob.reshape(want.shape), want)
  # The packed-float description of caffe.proto decodes the same file to the same values.
  net = TYPED["NetParameter"]()
  with open(path, "rb") as f:
    net.ParseFromString(f.read())
  records = net.layers if old_format else net.layer
  np.testing.assert_array_equal(np.asarray(records[1].blobs[0].data, np.float32), layers["fc8-101"][0].ravel())


def test_unknown_and_unpacked_fields(tmp_path):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(2, 3)).astype(np.float32)
  # An unpacked float field (one tag per value, as some writers emit) and unknown fields
  # (LayerParameter.bottom = 3, NetParameter.input = 3, input_dim = 4) that real files carry.
  blob = TYPED["BlobProto"]()
  blob.shape.dim.extend(w.shape)
  blob_bytes = blob.SerializeToString() + b"".join(b"\x2d" + v.astype("<f4").tobytes() for v in w.ravel())
  layer = TYPED["LayerParameter"](name="fc6", type="InnerProduct").SerializeToString()
  layer += b"\x1a\x04data" + b"\x3a" + _VarintBytes(len(blob_bytes)) + blob_bytes
  net = b"\x1a\x04data\x20\xe0\x01" + _VarintBytes((100 << 3) | 2) + _VarintBytes(len(layer)) + layer
  path = str(tmp_path / "unpacked.caffemodel")
  with open(path, "wb") as f:
    f.write(net)
  got = caffe.read_caffemodel(path)
  assert list(got) == ["fc6"]
  np.testing.assert_array_equal(got["fc6"][0], w)


def test_caffe_preprocess_is_bgr_mean_subtraction():
  images = np.random.default_rng(2).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  want = images[..., ::-1].astype(np.float32) - np.array([104.0, 117.0, 123.0], np.float32)
  np.testing.assert_allclose(np.asarray(CAFFE_BGR(images)), want, atol=1e-5)


def photos() -> np.ndarray:
  from PIL import Image
  if os.path.isdir(UTKFACE):
    images = [Image.open(os.path.join(UTKFACE, n)).convert("RGB") for n in sorted(os.listdir(UTKFACE))[:2]]
  else:
    from skimage import data
    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]
  return np.stack([np.asarray(im.resize((224, 224), Image.BILINEAR)) for im in images])


def caffe_layers_from_torchvision(state: dict, head_name: str, head_rows: int) -> dict[str, list[np.ndarray]]:
  """Caffe VGG-16 blobs holding torchvision weights; conv1_1 takes BGR, so its input channels are reversed."""
  t = {k: v.numpy() for k, v in state.items()}
  layers = {}
  for name, i in zip(vgg.CONV_NAMES, vgg.TORCHVISION_CONV_INDICES, strict=True):
    w = t[f"features.{i}.weight"]
    layers[name] = [w[:, ::-1] if name == "conv1_1" else w, t[f"features.{i}.bias"]]
  layers["fc6"] = [t["classifier.0.weight"], t["classifier.0.bias"]]
  layers["fc7"] = [t["classifier.3.weight"], t["classifier.3.bias"]]
  layers[head_name] = [t["classifier.6.weight"][:head_rows], t["classifier.6.bias"][:head_rows]]
  return layers


def test_caffe_port_matches_torchvision_through_each_channel_order(tmp_path):
  torch.manual_seed(0)
  reference = torchvision.models.vgg16().eval()
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.05)
  images = photos()
  x_caffe = np.asarray(CAFFE_BGR(images))  # BGR, 0-255, mean-subtracted: what Caffe feeds DEX
  with torch.no_grad():  # torchvision sees the same pixels in RGB order
    ref = reference(torch.from_numpy(np.ascontiguousarray(x_caffe[..., ::-1].transpose(0, 3, 1, 2)))).numpy()
  scale = np.abs(ref).max()
  assert scale > 1e-2 and np.abs(ref[0] - ref[1]).max() > 1e-3 * scale
  state = reference.state_dict()
  del reference
  # New `layer` format with ImageNet's fc8; old V1 `layers` format with DEX's 101-way fc8-101.
  for old_format, head_name, rows in ((False, "fc8", 1000), (True, "fc8-101", 101)):
    path = str(tmp_path / f"vgg16_{head_name}.caffemodel")
    caffe.write_caffemodel(path, caffe_layers_from_torchvision(state, head_name, rows), old_format=old_format)
    spec, variables, pre = vgg.convert("caffe", path, "vgg16")
    os.remove(path)
    assert pre == CAFFE_BGR
    assert spec["num_classes"] == rows and spec["head"] == ("dex" if rows == 101 else "classes")
    logits = np.asarray(build_model(spec).apply(variables, np.asarray(pre(images))))
    assert logits.shape == (2, rows)
    assert np.abs(logits - ref[:, :rows]).max() <= 1e-4 * scale, head_name
