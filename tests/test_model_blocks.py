"""The shared conv/BatchNorm settings of the BN backbones, and the shared weight-mapping helpers of the ports."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax.cli import run_command
from agejax.errors import AgejaxError, CheckpointError
from agejax.models.blocks import SETTINGS, ConvBNSettings, settings
from agejax.models.efficientnet import EfficientNet
from agejax.models.mobilenet import ConvBN, MobileNetV2
from agejax.models.wideresnet import WideBasic, WideResNet
from agejax.porting.keras_io import flat_weights
from agejax.porting.mobilenet import BlockNames, WeightMapper, map_mbconv_net


def test_settings_are_keyword_only_after_each_modules_own_fields():
  assert WideResNet(10, 1).depth == 10 and WideResNet(10, 1).widen_factor == 1
  unit = ConvBN(8, 3, 2, padding="tf_same")
  assert (unit.features, unit.kernel, unit.stride, unit.padding) == (8, 3, 2, "tf_same")
  for cls in (ConvBN, MobileNetV2, EfficientNet, WideBasic, WideResNet):
    kw_only = {f.name for f in dataclasses.fields(cls) if f.kw_only}
    assert set(SETTINGS) <= kw_only, cls
    params = inspect.signature(cls).parameters
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in SETTINGS), cls


def test_torch_and_keras_defaults():
  torch_like, keras_like = settings(MobileNetV2()), settings(WideResNet())
  assert (torch_like["padding"], torch_like["bn_eps"], torch_like["bn_momentum"]) == ("torch", 1e-5, 0.9)
  assert (keras_like["padding"], keras_like["bn_eps"], keras_like["bn_momentum"]) == ("tf_same", 1e-3, 0.99)
  assert set(settings(WideBasic(4))) == set(SETTINGS) == {f.name for f in dataclasses.fields(ConvBNSettings)} - {
      "parent", "name"}


def test_frozen_batchnorm_keeps_its_statistics_in_training():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  for frozen, changes in ((False, True), (True, False)):
    unit = ConvBN(4, 3, bn_train=not frozen)
    v = unit.init(jax.random.key(1), x)
    _, upd = unit.apply(v, x, train=True, mutable=["batch_stats"])
    moved = not np.array_equal(upd["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"])
    assert moved == changes


def _mapper(layout, entries):
  return WeightMapper({k: np.asarray(v, np.float32) for k, v in entries.items()}, "file", layout)


def test_torch_and_keras_layouts_land_in_the_same_flax_names():
  rng = np.random.default_rng(0)
  hwio, dense, stats = rng.normal(size=(3, 3, 2, 4)), rng.normal(size=(4, 5)), rng.normal(size=(4, 4))
  torch = _mapper("torch", {"c.weight": hwio.transpose(3, 2, 0, 1), "b.weight": stats[0], "b.bias": stats[1],
                            "b.running_mean": stats[2], "b.running_var": stats[3], "fc.weight": dense.T,
                            "fc.bias": stats[0, :1]})
  keras = _mapper("keras", {"c/kernel": hwio, "b/gamma": stats[0], "b/beta": stats[1], "b/moving_mean": stats[2],
                            "b/moving_variance": stats[3], "fc/kernel": dense, "fc/bias": stats[0, :1]})
  for m in (torch, keras):
    m.conv_bn(("c", "b"), "unit")
    m.dense("fc")
    assert m.used == set(m.entries)
  assert sorted(torch.out) == sorted(keras.out) and len(torch.out) == 7
  for k in torch.out:
    np.testing.assert_array_equal(torch.out[k], keras.out[k])
  assert torch.out["batch_stats/backbone/unit/bn/var"].tolist() == stats[3].astype(np.float32).tolist()
  assert torch.num_classes() == 5


def test_keras_depthwise_kernel_is_transposed_and_checked():
  w = np.arange(18, dtype=np.float32).reshape(3, 3, 2, 1)
  m = _mapper("keras", {"d/depthwise_kernel": w})
  m.conv("d", "dw/conv", depthwise=True)
  assert m.out["params/backbone/dw/conv/kernel"].shape == (3, 3, 1, 2)
  with pytest.raises(CheckpointError, match="layer d: depthwise kernel"):
    _mapper("keras", {"d/kernel": w[..., 0]}).conv("d", "dw/conv", depthwise=True)


def test_map_mbconv_net_takes_the_optional_parts_only_where_the_block_has_them():
  names = {"expand": ("e", "eb"), "dwconv": ("d", "db"), "se": ("r", "x"), "project": ("p", "pb")}
  entries = {f"{c}.weight": np.zeros((1, 1, 1, 1)) for c in ("s", "h", "e", "d", "p", "r", "x")}
  entries |= {f"{c}.bias": np.zeros(1) for c in ("r", "x")}
  entries |= {f"{bn}.{s}": np.zeros(1) for bn in ("sb", "hb", "eb", "db", "pb")
              for s in ("weight", "bias", "running_mean", "running_var")}
  m = _mapper("torch", {**entries, "fc.weight": np.zeros((2, 3)), "fc.bias": np.zeros(2)})
  map_mbconv_net(m, ("s", "sb"), [BlockNames(names, expand=False), BlockNames(names, expand=True, squeeze=True)],
                 ("h", "hb"), "fc")
  parts = {i: {k.split("/")[3] for k in m.out if k.startswith(f"params/backbone/blocks_{i}/")} for i in (0, 1)}
  assert parts == {0: {"dwconv", "project"}, 1: {"expand", "dwconv", "se", "project"}}
  assert "params/backbone/blocks_1/se/fc2/bias" in m.out and "batch_stats/backbone/head_conv/bn/var" in m.out
  assert m.used == set(m.entries) and m.num_classes() == 2


def test_flat_weights_names_a_repeated_weight():
  assert flat_weights({"a": [("kernel", np.ones(1)), ("bias", np.zeros(1))]}, "w.h5").keys() == {"a/kernel", "a/bias"}
  with pytest.raises(CheckpointError, match=r"w\.h5: layer a has two weights named 'kernel'"):
    flat_weights({"a": [("kernel", np.ones(1)), ("kernel", np.zeros(1))]}, "w.h5")


def test_run_command_prints_the_line_or_a_one_line_error(capsys):
  assert run_command(lambda: "done") == 0
  assert capsys.readouterr().out == "done\n"

  def fail() -> str:
    raise AgejaxError("x.onnx exists")

  assert run_command(fail, status=2) == 2
  captured = capsys.readouterr()
  assert captured.err == "error: x.onnx exists\n" and captured.out == ""
  with pytest.raises(KeyError):  # not a user error: it propagates
    run_command(lambda: {}["k"])
  assert run_command(lambda: open("/nonexistent/file").read(), errors=(AgejaxError, FileNotFoundError)) == 1
  assert capsys.readouterr().err.startswith("error: ")


def test_mbconv_backbones_run_with_their_shared_body():
  x = jnp.zeros((1, 32, 32, 3))
  for model in (MobileNetV2(width=0.25), EfficientNet(width=0.25, depth_mult=0.5, lite=True)):
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    assert {"stem", "blocks_0", "head_conv"} <= set(v["params"])
    assert "Dropout_0" not in v["params"]
