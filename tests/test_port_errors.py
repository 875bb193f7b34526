"""Bad checkpoints fail with errors that name the file, the layer and both shapes."""

import os
import subprocess
import sys

import numpy as np
import pytest

from agejax.errors import CheckpointError
from agejax.porting import caffe, vgg
from agejax.porting.keras_io import read_h5_weights
from agejax.porting.torch_io import load_state_dict

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

ROOT = os.path.join(os.path.dirname(__file__), "..")


def vgg16_shapes() -> dict[str, tuple[int, ...]]:
  """torchvision VGG-16 state-dict shapes, without building the model."""
  shapes, cin = {}, 3
  convs = [c for n, c in vgg.VGG16_BLOCKS for _ in range(n)]
  for i, cout in zip(vgg.TORCHVISION_CONV_INDICES, convs, strict=True):
    shapes[f"features.{i}.weight"], shapes[f"features.{i}.bias"] = (cout, cin, 3, 3), (cout,)
    cin = cout
  for i, (out, fan_in) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096)), strict=True):
    shapes[f"classifier.{i}.weight"], shapes[f"classifier.{i}.bias"] = (out, fan_in), (out,)
  return shapes


def save(state: dict[str, tuple[int, ...]], path) -> str:
  torch.save({k: torch.zeros(s) for k, s in state.items()}, str(path))
  return str(path)


def tiny(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  # Names are checked before shapes, so name errors need no full-size file.
  return {k: (1,) for k in shapes}


def test_wrong_architecture_is_named(tmp_path):
  src = str(tmp_path / "mobilenet_v2.pth")
  torch.save(torchvision.models.mobilenet_v2().state_dict(), src)
  with pytest.raises(CheckpointError) as e:
    vgg.convert("torchvision", src, "vgg16")
  msg = str(e.value)
  assert src in msg and "not a VGG-16 checkpoint" in msg and "features.0.weight" in msg
  assert "conv1_1" in msg


def test_missing_layer(tmp_path):
  shapes = tiny(vgg16_shapes())
  del shapes["features.28.weight"], shapes["features.28.bias"]
  src = save(shapes, tmp_path / "missing.pth")
  with pytest.raises(CheckpointError, match=r"features\.28\.weight \(conv5_3\)") as e:
    vgg.convert("torchvision", src, "vgg16")
  assert src in str(e.value) and "features.26" not in str(e.value)


def test_extra_layer(tmp_path):
  shapes = tiny(vgg16_shapes()) | {"classifier.9.weight": (1,)}
  src = save(shapes, tmp_path / "extra.pth")
  with pytest.raises(CheckpointError, match=r"1 checkpoint entries match no layer.*classifier\.9\.weight"):
    vgg.convert("torchvision", src, "vgg16")


def test_wrong_shape_names_layer_and_both_shapes(tmp_path):
  shapes = vgg16_shapes() | {"classifier.0.weight": (4096, 512)}
  src = save(shapes, tmp_path / "wrong_shape.pth")
  with pytest.raises(CheckpointError) as e:
    vgg.convert("torchvision", src, "vgg16")
  msg = str(e.value)
  assert "fc6" in msg and "classifier.0.weight" in msg and "(4096, 512)" in msg and "(4096, 25088)" in msg
  assert "conv1_1" not in msg and "fc7" not in msg


def test_truncated_files_name_the_file(tmp_path):
  full = str(tmp_path / "full.pth")
  torch.save({"w": torch.ones(1000)}, full)
  torch.save({"w": torch.ones(1000)}, str(tmp_path / "legacy.pth"), _use_new_zipfile_serialization=False)
  cm = str(tmp_path / "net.caffemodel")
  caffe.write_caffemodel(cm, {"fc8": [np.ones((10, 10), np.float32)]})
  with open(tmp_path / "weights.h5", "wb") as f:
    f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
  for name in ("full.pth", "legacy.pth", "net.caffemodel"):
    data = (tmp_path / name).read_bytes()
    (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
  assert set(load_state_dict(full)) == {"w"}
  for path, reader in ((tmp_path / "cut_full.pth", load_state_dict), (tmp_path / "cut_legacy.pth", load_state_dict),
                       (tmp_path / "cut_net.caffemodel", caffe.read_caffemodel),
                       (tmp_path / "weights.h5", read_h5_weights)):
    with pytest.raises(CheckpointError, match="truncated") as e:
      reader(str(path))
    assert str(path) in str(e.value)


def test_keras_file_without_top_is_rejected(tmp_path):
  h5py = pytest.importorskip("h5py")
  src = str(tmp_path / "notop.h5")
  with h5py.File(src, "w") as f:
    f.attrs["layer_names"] = [b"block1_conv1"]
    g = f.create_group("block1_conv1")
    g.attrs["weight_names"] = [b"block1_conv1/kernel:0", b"block1_conv1/bias:0"]
    g["block1_conv1/kernel:0"], g["block1_conv1/bias:0"] = np.zeros((3, 3, 3, 64)), np.zeros(64)
  with pytest.raises(CheckpointError, match="include_top=True"):
    vgg.convert("keras", src, "vgg16")


def test_cli_reports_a_readable_error(tmp_path):
  src = tmp_path / "broken.pth"
  src.write_bytes(b"PK\x03\x04 not really a checkpoint")
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
  proc = subprocess.run([sys.executable, "-m", "agejax.port", "--format", "torchvision", "--arch", "vgg16",
                         str(src), str(tmp_path / "prior")], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode != 0
  assert proc.stderr.startswith("error:") and str(src) in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "prior")


def test_port_onto_an_existing_out_is_a_one_line_error(tmp_path, capsys):
  from agejax.port import main

  src = tmp_path / "any.pth"
  src.write_bytes(b"irrelevant: OUT is checked before the checkpoint is read")
  out = tmp_path / "prior"
  out.mkdir()
  (out / "keep.txt").write_text("an earlier prior")
  assert main(["--format", "torchvision", "--arch", "vgg16", str(src), str(out)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: {out} already exists") and "--force" in err
  assert (out / "keep.txt").read_text() == "an earlier prior"


def test_random_bytes_pth_is_not_a_pytorch_checkpoint(tmp_path, capsys):
  from agejax.port import main

  src = tmp_path / "random.pth"
  src.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  assert main(["--format", "torchvision", "--arch", "vgg16", str(src), str(tmp_path / "prior")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: {src}: not a PyTorch checkpoint")
  assert "weights_only" not in err and "trusted source" not in err
  assert not os.path.exists(tmp_path / "prior")


def test_port_help_exits_zero():
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
  proc = subprocess.run([sys.executable, "-m", "agejax.port", "--help"], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0 and "--keep-heads" in proc.stdout and "--force" in proc.stdout
  assert "onnx" in proc.stdout and "wrn16_8" in proc.stdout
