"""EfficientNet ports: torchvision B3, the efficientnet_lite_pytorch layout (Lite0), and Keras B3, each a
reference model with random weights saved in its real file format, ported and compared logit for logit."""

import jax
import numpy as np
import pytest

from agejax.errors import CheckpointError
from agejax.models.pretrained import load_pretrained
from agejax.port import port

torch = pytest.importorskip("torch")

from test_port_mobilenet import assert_logits_close, randomize_bn, torch_logits  # noqa: E402


def _port_and_load(fmt: str, path: str, arch: str, out):
  spec = port(fmt, path, str(out), arch)
  model, variables, preprocess = load_pretrained(str(out))
  return spec, jax.jit(model.apply), variables, preprocess


def test_torchvision_b3_parity_odd_and_even_sizes(tmp_path):
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  ref = torchvision.models.efficientnet_b3().eval()
  randomize_bn(ref)
  torch.save(ref.state_dict(), tmp_path / "b3.pth")
  spec, apply, variables, preprocess = _port_and_load("torchvision", str(tmp_path / "b3.pth"), "efficientnet_b3",
                                                      tmp_path / "prior")
  assert spec["backbone"]["padding"] == "torch" and spec["backbone"]["bn_eps"] == 1e-5
  assert (preprocess.resize, preprocess.crop) == (320, 300)
  rng = np.random.default_rng(1)
  for size in (64, 67):
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    assert_logits_close(apply(variables, x), torch_logits(ref, x))


def test_lite_layout_parity_odd_and_even_sizes(tmp_path):
  lite = pytest.importorskip("efficientnet_lite_pytorch")
  torch.manual_seed(0)
  # image_size=None selects the reference's dynamic TF-'SAME' padding, valid for any input size.
  ref = lite.EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
  randomize_bn(ref, seed=1)
  torch.save(ref.state_dict(), tmp_path / "lite0.pth")
  spec, apply, variables, preprocess = _port_and_load("efficientnet-lite", str(tmp_path / "lite0.pth"),
                                                      "efficientnet_lite0", tmp_path / "prior")
  assert spec["backbone"] == {"padding": "tf_same", "bn_eps": 1e-3, "bn_momentum": 0.99}
  assert (preprocess.mean, preprocess.std, preprocess.crop) == ((127.0,) * 3, (128.0,) * 3, 224)
  rng = np.random.default_rng(2)
  for size in (64, 67):
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    assert_logits_close(apply(variables, x), torch_logits(ref, x))


def test_lite_file_for_the_wrong_variant_is_an_error(tmp_path):
  lite = pytest.importorskip("efficientnet_lite_pytorch")
  ref = lite.EfficientNet.from_name("efficientnet-lite0", image_size=None)
  torch.save(ref.state_dict(), tmp_path / "lite0.pth")
  with pytest.raises(CheckpointError, match="match no layer|missing|shape"):
    port("efficientnet-lite", str(tmp_path / "lite0.pth"), str(tmp_path / "p"), "efficientnet_lite2")
  with pytest.raises(CheckpointError, match="torchvision has no efficientnet_lite0"):
    port("torchvision", str(tmp_path / "lite0.pth"), str(tmp_path / "q"), "efficientnet_lite0")


@pytest.mark.slow  # ~90 s on a loaded 2-core CPU (Keras builds and compiles the full B3)
def test_keras_b3_parity_with_internal_normalisation(tmp_path):
  from test_port_mobilenet import keras_module, randomize_keras_bn, save_keras_h5

  keras = keras_module()
  keras.utils.set_random_seed(0)
  # Even size: where TF 'SAME' (0, 1) and torch's symmetric (1, 1) stride-2 padding differ.
  ref = keras.applications.EfficientNetB3(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
  randomize_keras_bn(ref)
  norm = [layer for layer in ref.layers if type(layer).__name__ == "Normalization"]
  assert len(norm) == 1
  norm[0].set_weights([np.array([0.45, 0.5, 0.4]), np.array([0.06, 0.05, 0.07]), np.array(1.0)])
  norm[0].finalize_state()  # the layer computes with copies it refreshes here (load_weights does the same)
  path = save_keras_h5(ref, tmp_path / "b3.h5")
  spec, apply, variables, preprocess = _port_and_load("keras", path, "efficientnet_b3", tmp_path / "prior")
  assert spec["backbone"]["padding"] == "tf_same"
  np.testing.assert_allclose(preprocess.std, np.sqrt([0.06, 0.05, 0.07]), rtol=1e-5)
  images = np.random.default_rng(3).integers(0, 256, size=(2, 64, 64, 3)).astype(np.uint8)
  assert_logits_close(apply(variables, preprocess(images)), ref.predict(images.astype(np.float32), verbose=0))
