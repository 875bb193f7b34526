"""MobileNetV2 ports: torchvision and Keras reference models with random weights, saved in their real
file formats, ported with agejax.port and compared logit for logit; plus strictness on bad files."""

import jax
import numpy as np
import pytest

from agejax.errors import CheckpointError
from agejax.models.pretrained import load_pretrained
from agejax.port import port

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def randomize_bn(model, seed: int = 0) -> None:
  """Non-trivial BatchNorm affine parameters and running statistics, so the BN mapping is exercised."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def assert_logits_close(ours, ref) -> None:
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  scale = max(1.0, float(np.abs(ref).max()))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4 * scale)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
  torch.manual_seed(0)
  model = torchvision.models.mobilenet_v2().eval()
  randomize_bn(model)
  path = tmp_path_factory.mktemp("mnv2") / "mobilenet_v2.pth"
  torch.save(model.state_dict(), path)
  return model, str(path)


def test_torchvision_parity_odd_and_even_sizes(torchvision_file, tmp_path):
  ref, path = torchvision_file
  spec = port("torchvision", path, str(tmp_path / "prior"), "mobilenet_v2")
  assert spec["head"] == "classes" and spec["num_classes"] == 1000
  model, variables, preprocess = load_pretrained(str(tmp_path / "prior"))
  assert (preprocess.crop, preprocess.mean) == (224, (0.485, 0.456, 0.406))
  apply = jax.jit(model.apply)
  rng = np.random.default_rng(0)
  for size in (64, 67):  # stride-2 padding differs between conventions on even inputs
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    assert_logits_close(apply(variables, x), torch_logits(ref, x))


def _save_state(state, path) -> str:
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
  return str(path)


def test_missing_extra_and_misshapen_layers_are_errors(torchvision_file, tmp_path):
  from agejax.porting.torch_io import load_state_dict

  _, path = torchvision_file
  state = load_state_dict(path)
  missing = {k: v for k, v in state.items() if k != "features.5.conv.1.1.running_var"}
  with pytest.raises(CheckpointError, match="blocks_4/dwconv/bn/var"):
    port("torchvision", _save_state(missing, tmp_path / "m.pth"), str(tmp_path / "p1"), "mobilenet_v2")
  extra = {**state, "features.19.0.weight": np.zeros((8, 8, 1, 1), np.float32)}
  with pytest.raises(CheckpointError, match="features.19.0.weight"):
    port("torchvision", _save_state(extra, tmp_path / "e.pth"), str(tmp_path / "p2"), "mobilenet_v2")
  bad = {**state, "features.3.conv.0.0.weight": np.zeros((144, 20, 1, 1), np.float32)}
  with pytest.raises(CheckpointError, match=r"blocks_2/expand/conv/kernel.*\(1, 1, 20, 144\).*\(1, 1, 24, 144\)"):
    port("torchvision", _save_state(bad, tmp_path / "b.pth"), str(tmp_path / "p3"), "mobilenet_v2")
  with pytest.raises(CheckpointError):
    port("torchvision", path, str(tmp_path / "p4"), "efficientnet_b0")


def keras_module():
  """keras on the JAX backend (the backend is fixed at first import)."""
  import os

  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip(f"keras already imported with backend {keras.backend.backend()}")
  return keras


def randomize_keras_bn(model, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if type(layer).__name__ == "BatchNormalization":
      n = layer.get_weights()[0].shape[0]
      layer.set_weights([1 + 0.2 * rng.normal(size=n), 0.2 * rng.normal(size=n), 0.2 * rng.normal(size=n),
                         0.5 + rng.uniform(size=n)])


def save_keras_h5(model, path) -> str:
  import h5py
  from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

  with h5py.File(path, "w") as f:
    save_weights_to_hdf5_group(f, model)
  return str(path)


def test_keras_parity_odd_and_even_sizes(tmp_path):
  keras = keras_module()
  keras.utils.set_random_seed(0)
  build = lambda size: keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3),
                                                      classifier_activation=None)
  ref = build(64)
  randomize_keras_bn(ref)
  path = save_keras_h5(ref, tmp_path / "mobilenet_v2.h5")
  spec = port("keras", path, str(tmp_path / "prior"), "mobilenet_v2")
  assert spec["backbone"]["padding"] == "tf_same" and spec["backbone"]["bn_eps"] == 1e-3
  model, variables, preprocess = load_pretrained(str(tmp_path / "prior"))
  apply = jax.jit(model.apply)
  rng = np.random.default_rng(0)
  for size in (64, 67):
    ref_s = build(size)
    ref_s.set_weights(ref.get_weights())
    images = rng.integers(0, 256, size=(2, size, size, 3)).astype(np.uint8)
    x = np.asarray(preprocess(images))
    np.testing.assert_allclose(x, images / 127.5 - 1, atol=1e-6)
    assert_logits_close(apply(variables, x), ref_s.predict(x, verbose=0))
