"""Throughput of the trial engine: every trial strategy x conv implementation, plus a PyTorch reference loop.

  python -m agejax.bench                                    # vgg16_tiny, 32 trials, 64 px, batch 8 (docs/machine.md)
  python -m agejax.bench --quick --no-torch --out tmp/bench.json

Prints one JSON object. For each (strategy, conv_impl) it times the first call of the step chunk (compile
plus one chunk, reported as `first_call_s`; `compile_s` subtracts the steady chunk time), then the best of
`--repeats` chunks over all T trials, and reports images/s, XLA's FLOP count of one trial step and the
achieved FLOP/s. Ratios (`speedup_vs_loop_lax`, `ratio_best_jax_vs_torch`) come from numbers of this run
only: timings on a shared machine are only comparable within one run. `protocol_grid` costs a paper protocol's
full grid (`--protocol`) at the measured images/s.

  python -m agejax.bench --model wrn16_8 --freeze backbone --trials 32 --steps 1 --repeats 1 --pool 16

With `--freeze` (agejax.engine.features) it times the tail trained on cached prefix features against the frozen
stages recomputed every step and a PyTorch loop doing the same partial fine-tuning (`ratio_cached_vs_recompute`).
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agejax.configs import PAPER_SOLVERS, base_config, solver_sizes, tiny_vgg
from agejax.engine import autotune
from agejax.engine import features as features_lib
from agejax.engine import memory as memory_lib
from agejax.engine import trials as trials_lib
from agejax.engine.optim import CAFFE_VGG_RULES, make_optimizer
from agejax.experiments.engines import trial_starter, with_engine_backbone
from agejax.experiments.priors import Prior, resolve_prior
from agejax.models import build_model
from agejax.models.registry import with_conv_plan
from agejax.parallel import sharding as sharding_lib
from agejax.parallel.distributed import maybe_initialize

MODELS = ("vgg16_tiny", "vgg16", "mobilenet_v2", "efficientnet_b3", "wrn16_8", "dlib_resnet10")
CONV_IMPLS = ("auto", "lax", "canonical", "patches")
# Dense peak FLOP/s per device kind (vendor datasheets; SXM parts), by compute dtype, for MFU.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12}, "L4": {"bfloat16": 121e12, "float32": 30e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12}, "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12}, "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}
# The setting of docs/machine.md; --quick shrinks everything (a smoke run: compile time dominates).
DEFAULTS = dict(trials=32, res=64, batch=8, steps=2, repeats=3, pool=256)
QUICK = dict(trials=2, res=32, batch=2, steps=1, repeats=1, pool=16)
PREPROCESS = dict(channel_order="BGR", scale=255.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0))


def _timed(setup: Any, entry: dict[str, Any], images_per_chunk: int, label: str) -> dict[str, Any]:
  """`entry` with the timings of `setup.time_strategy(entry['strategy'])` and its images/s, or the error: one
  failing combination (e.g. out of memory) does not sink the rest."""
  try:
    entry.update(setup.time_strategy(entry["strategy"]))
  except Exception as e:
    entry["error"] = f"{type(e).__name__}: {e}"[:500]
    return entry
  entry["images_per_s"] = images_per_chunk / entry["chunk_s"]
  print(f"[bench] {label} {entry['images_per_s']:9.1f} images/s  compile {entry['compile_s']:.1f} s",
        file=sys.stderr, flush=True)
  return entry


def model_spec(model: str, conv_impl: str, quick: bool = False) -> dict[str, Any]:
  """The agejax model spec a benchmark model name stands for."""
  if model == "vgg16_tiny":
    return tiny_vgg(width=1 / 16, fc_dim=32, conv_impl=conv_impl) if quick else tiny_vgg(1 / 8, 512, conv_impl)
  if model == "vgg16":
    return dict(arch="vgg16", head="dex", backbone=dict(conv_impl=conv_impl))
  if model in ("mobilenet_v2", "efficientnet_b3"):
    return dict(arch=model, head="dex", backbone=dict(conv_impl=conv_impl))
  if model in AGE_PRIOR_MODELS:
    return age_prior_spec(model, conv_impl, quick)
  raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")


def flops_of(compiled: Any) -> float | None:
  """FLOPs from XLA's cost analysis (a dict, or a list of dicts in older JAX); None when absent."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  value = float(cost["flops"])
  return value if math.isfinite(value) and value > 0 else None


def device_info() -> dict[str, Any]:
  """Backend, device and host description."""
  dev = jax.devices()[0]
  cpu_model = platform.processor() or None
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_model)
  except OSError:
    pass
  return {"backend": jax.default_backend(), "platform": dev.platform, "kind": dev.device_kind, "name": str(dev),
          "count": jax.device_count(), "nproc": os.cpu_count(), "cpu_model": cpu_model}


def peak_flops(device_kind: str, dtype: str, override_tflops: float | None = None) -> float | None:
  """The device's dense peak FLOP/s for `dtype` (None when unknown, e.g. CPUs: pass --peak-tflops)."""
  if override_tflops:
    return override_tflops * 1e12
  for name, peaks in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def bench_prior(model: str, conv_impls: Sequence[str], s: argparse.Namespace) -> dict[str, Prior]:
  """A from-scratch prior per conv implementation; they share one set of initial weights."""
  base = resolve_prior({"name": "bench", "model": model_spec(model, conv_impls[0], s.quick)},
                       {"head": "dex", "preprocess": PREPROCESS}, s.res, 0)
  dtype = "spec" if s.dtype == "float32" else s.dtype  # float32: the spec's own dtype
  return {impl: with_engine_backbone(base, impl, dtype) for impl in conv_impls}


def peak_device_bytes() -> int | None:
  """Peak bytes in use on the first device since start (accelerators; None on CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # not implemented on every backend
    return None
  return stats.get("peak_bytes_in_use")


def tuned_prior(prior: Prior, s: argparse.Namespace) -> tuple[Prior, dict[str, int] | None]:
  """An 'auto' prior with its measured per-layer plan in its spec (as the engine does), and the counts per
  choice; any other prior as it is, and None."""
  if prior.spec["backbone"].get("conv_impl") != "auto":
    return prior, None
  plan = autotune.plan_model(prior.model, prior.variables, (s.batch, s.res, s.res, 3))
  spec = with_conv_plan(prior.spec, plan)
  return dataclasses.replace(prior, spec=spec, model=build_model(spec)), autotune.counts_of(plan)


class Setup:
  """One conv implementation's prior, optimiser, step chunk and synthetic data, shared by the strategies."""

  def __init__(self, prior: Prior, s: argparse.Namespace):
    self.s = s
    self.prior, self.conv_plan = tuned_prior(prior, s)
    optim_cfg = ml_collections.ConfigDict(dict(name="caffe_sgd", base_lr=1e-4, momentum=0.9, weight_decay=5e-4,
                                               gamma=0.1, rules=CAFFE_VGG_RULES))
    self.optimizer = make_optimizer(optim_cfg, self.prior.variables["params"])
    step_cfg = trials_lib.StepConfig(s.batch, s.res)
    self.initial_state = trial_starter(self.prior, self.optimizer, s.res)
    self.step = trials_lib.make_step(self.prior.model, "dex", self.prior.preprocess, self.optimizer, step_cfg)
    self.chunk = trials_lib.make_train_chunk(self.prior.model, "dex", self.prior.preprocess, self.optimizer, step_cfg)
    self.predict = trials_lib.make_predict(self.prior.model, "dex", self.prior.preprocess)
    rng = np.random.default_rng(0)
    self.pool_images = jnp.asarray(rng.integers(0, 256, (s.pool, s.res, s.res, 3), dtype=np.uint8))
    self.pool_ages = jnp.asarray(rng.uniform(1, 90, s.pool).astype(np.float32))
    steps = s.steps * (s.repeats + 1)
    self.orders = np.stack([trials_lib.sample_order(np.arange(s.pool), steps, s.batch, t) for t in range(s.trials)])
    big = jnp.asarray(10**6, jnp.int32)  # every step runs, at the base learning rate
    self.hyper = trials_lib.Hyper(big, big)

  def state(self, trial: int) -> trials_lib.TrialState:
    return self.initial_state(trial)

  def flops_per_step(self) -> float | None:
    """XLA's FLOPs of one SGD step of one trial, from a one-step chunk.

    XLA's cost analysis counts a loop body once, whatever its trip count, so a one-step chunk is the
    unambiguous probe. It is compiled like the 'loop' program (same donation), so with `--steps 1` it is a
    cache hit once 'loop' has run."""
    args = (jax.tree.map(jnp.copy, self.state(0)), jnp.asarray(0, jnp.int32), self.hyper,
            jnp.asarray(self.orders[0, :1]), self.pool_images, self.pool_ages)
    return flops_of(jax.jit(self.chunk, donate_argnums=0).lower(*args).compile())

  def memory(self) -> dict[str, Any]:
    """The engine's per-trial memory estimate beside XLA's analysis of the compiled one-trial step."""
    state = self.state(0)
    est = memory_lib.estimate_trial_memory(self.prior.model, {"params": state.params,
                                                              "batch_stats": state.batch_stats},
                                           state.opt_state, self.s.batch, self.s.res)
    args = (state, jnp.asarray(0, jnp.int32), self.hyper, jnp.asarray(self.orders[0, 0]), self.pool_images,
            self.pool_ages)
    xla = memory_lib.compiled_bytes(jax.jit(self.step, donate_argnums=0).lower(*args).compile())
    return {"estimate_per_trial": est.to_dict(), "xla_one_trial_step_bytes": xla,
            "shared_bytes": memory_lib.tree_bytes((self.pool_images, self.pool_ages))}

  def time_sequential(self) -> dict[str, Any]:
    """The baseline users write by hand: one jitted step per call, trials one after another, steps in Python."""
    s = self.s
    step = jax.jit(self.step, donate_argnums=0)
    states = [jax.tree.map(jnp.copy, self.state(t)) for t in range(s.trials)]  # own buffers: the step donates
    t0 = time.perf_counter()
    states[0], _ = step(states[0], jnp.asarray(0, jnp.int32), self.hyper, jnp.asarray(self.orders[0, 0]),
                        self.pool_images, self.pool_ages)
    jax.block_until_ready(states[0])
    first = time.perf_counter() - t0

    def one_chunk(r: int) -> float:
      t0 = time.perf_counter()
      for t in range(s.trials):
        for k in range(r * s.steps, (r + 1) * s.steps):
          states[t], loss = step(states[t], jnp.asarray(k, jnp.int32), self.hyper, jnp.asarray(self.orders[t, k]),
                                 self.pool_images, self.pool_ages)
      jax.block_until_ready(states)
      return time.perf_counter() - t0

    chunks = [one_chunk(r) for r in range(1, s.repeats + 1)]
    return {"first_call_s": first, "chunk_s": min(chunks), "chunk_s_all": chunks}

  def time_strategy(self, strategy: str) -> dict[str, Any]:
    """Compile seconds, then first-call and steady seconds of one chunk of `steps` steps over all trials."""
    s = self.s
    # All devices on the trial axis when there are several (e.g. one CPU device per core), as the engine does.
    runner = trials_lib.TrialRunner(self.chunk, self.predict, strategy, s.trial_chunk)
    layout = runner.layout(sharding_lib.MeshConfig(), s.trials)
    groups = layout.slices
    states = [runner.group([self.state(t) for t in range(sl.start, sl.stop)], layout) for sl in groups]
    jax.block_until_ready(states)

    def idx(g: int, r: int) -> np.ndarray:
      return self.orders[groups[g], r * s.steps:(r + 1) * s.steps]

    # Ahead-of-time compile of the runner's own jitted program (it fills the cache its calls use), so the
    # compile time is measured apart from execution. Groups of one size share one program.
    compile_s = 0.0
    for size in sorted({sl.stop - sl.start for sl in groups}):
      g = next(i for i, sl in enumerate(groups) if sl.stop - sl.start == size)
      t0 = time.perf_counter()
      compiled = runner.compile_train(states[g], idx(g, 0), 0, self.hyper, self.pool_images, self.pool_ages)
      compile_s += time.perf_counter() - t0
      program_bytes = memory_lib.compiled_bytes(compiled)

    def one_chunk(r: int) -> float:
      t0 = time.perf_counter()
      for g in range(len(groups)):
        states[g], losses = runner.train(states[g], idx(g, r), r * s.steps, self.hyper, self.pool_images,
                                         self.pool_ages)
        if not np.isfinite(losses).all():
          raise FloatingPointError(f"non-finite loss with strategy {strategy!r}")
      jax.block_until_ready(states)
      return time.perf_counter() - t0

    first = one_chunk(0)
    chunks = [one_chunk(r) for r in range(1, s.repeats + 1)]
    mesh = sharding_lib.mesh_of(states[0])
    return {"compile_s": compile_s, "first_call_s": first, "chunk_s": min(chunks), "chunk_s_all": chunks,
            "groups": len(groups), "devices": 1 if mesh is None else mesh.size, "program_bytes": program_bytes,
            "peak_device_bytes": peak_device_bytes()}


def torch_vgg(width: float, fc_dim: int, res: int, num_classes: int = 101) -> Any:
  """The narrowed VGG-16 of agejax.models.vgg in PyTorch: 13 3x3 convs (pad 1), 5 max pools, fc6/fc7, head."""
  from torch import nn

  from agejax.models.vgg import VGG16_BLOCKS

  layers, cin = [], 3
  for n, channels in VGG16_BLOCKS:
    cout = max(1, int(round(channels * width)))
    for _ in range(n):
      layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
      cin = cout
    layers.append(nn.MaxPool2d(2, 2))
  side = res // 32
  return nn.Sequential(*layers, nn.Flatten(),
                       nn.Linear(cin * side * side, fc_dim), nn.ReLU(inplace=True), nn.Dropout(0.5),
                       nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True), nn.Dropout(0.5),
                       nn.Linear(fc_dim, num_classes))


def torch_model(spec: dict[str, Any], res: int) -> Any:
  """The PyTorch counterpart of a benchmark model spec."""
  if spec["arch"] == "vgg16":
    b = spec.get("backbone", {})
    return torch_vgg(b.get("width", 1.0), b.get("fc_dim", 4096), res)
  if spec["arch"] in AGE_PRIOR_MODELS:
    return torch_age_prior(spec, res)
  import torchvision

  return getattr(torchvision.models, spec["arch"])(num_classes=101)


def torch_partial(model: Any, freeze: str) -> tuple[Any, list[Any]]:
  """(forward, trained parameters) of a torch WRN/dlib net fine-tuned from stage `freeze` on ('backbone': the
  head only): the stages before it run in eval mode under no_grad, recomputed every step, as one writes it."""
  import torch

  if freeze == "none":
    return model, list(model.parameters())
  if not hasattr(model, "stages"):
    raise ValueError(f"the torch {type(model).__name__} has no stages: --freeze needs wrn16_8 or dlib_resnet10")
  stages = model.stages()
  cut = len(stages) if freeze == "backbone" else [name for name, _, _ in stages].index(freeze)
  frozen = [m for _, m, _ in stages[:cut] if m is not None]
  for m in frozen:
    m.requires_grad_(False)

  def forward(x):
    for m in frozen:
      m.eval()
    with torch.no_grad():
      for _, _, f in stages[:cut]:
        x = f(x)
    for _, _, f in stages[cut:]:
      x = f(x)
    return model.fc(x)

  return forward, [p for p in model.parameters() if p.requires_grad]


def torch_reference(spec: dict[str, Any], s: argparse.Namespace, freeze: str = "none") -> dict[str, Any]:
  """A plain PyTorch loop over the same T trials one after another: SGD momentum 0.9, softmax CE (with `freeze`,
  only the stages from it on and the head train; `torch_partial`).

  On a CUDA device (when torch sees one and the JAX backend is a GPU) the models are channels-last and,
  with `--dtype bfloat16`, the forward runs under bf16 autocast: the fair fast PyTorch recipe. On CPU it is
  timed at each of `s.torch_threads` intra-op thread counts (all cores, and one: on a shared machine a
  second OpenMP thread can cost more than it brings); `images_per_s` is the best of them."""
  # Busy-waiting OpenMP threads collapse (100x here) when another process holds a core; libgomp reads
  # this when torch loads it, so it only takes effect if torch was not imported yet.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch

  torch.manual_seed(0)
  cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  layout = torch.channels_last if cuda else torch.contiguous_format
  autocast = cuda and s.dtype == "bfloat16"
  rng = np.random.default_rng(0)
  pool = torch.from_numpy(rng.integers(0, 256, (s.pool, 3, s.res, s.res), dtype=np.uint8)).to(device)
  labels = torch.from_numpy(rng.integers(0, 101, s.pool)).to(device)
  mean = torch.tensor(PREPROCESS["mean"]).view(1, 3, 1, 1).to(device)
  orders = np.stack([trials_lib.sample_order(np.arange(s.pool), s.steps * (s.repeats + 1), s.batch, t)
                     for t in range(s.trials)])

  def run_trial(model: Any, opt: Any, order: np.ndarray) -> None:
    model, forward = model
    model.train()
    for idx in order:
      idx = torch.from_numpy(idx).long().to(device)
      x = (pool[idx].float() - mean).contiguous(memory_format=layout)
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = torch.nn.functional.cross_entropy(forward(x).float(), labels[idx])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    if not math.isfinite(loss.item()):
      raise FloatingPointError("non-finite torch loss")

  def one_chunk(r: int) -> float:
    t0 = time.perf_counter()
    for t, (model, opt) in enumerate(trials):
      run_trial(model, opt, orders[t, r * s.steps:(r + 1) * s.steps])
    if cuda:
      torch.cuda.synchronize()
    return time.perf_counter() - t0

  trials = []
  for _ in range(s.trials):
    model = torch_model(spec, s.res).to(device, memory_format=layout)
    forward, trained = torch_partial(model, freeze)
    trials.append(((model, forward), torch.optim.SGD(trained, lr=1e-4, momentum=0.9, weight_decay=5e-4)))
  by_threads = {}
  for threads in [0] if cuda else s.torch_threads:
    if threads:
      torch.set_num_threads(threads)
    first = one_chunk(0)  # warm-up (allocator, oneDNN primitives)
    chunks = [one_chunk(r) for r in range(1, s.repeats + 1)]
    by_threads[str(threads)] = {"first_chunk_s": first, "chunk_s": min(chunks), "chunk_s_all": chunks,
                                "images_per_s": s.trials * s.steps * s.batch / min(chunks)}
  best = max(by_threads, key=lambda k: by_threads[k]["images_per_s"])
  return {"version": torch.__version__, "device": str(device), "channels_last": cuda, "autocast_bf16": autocast,
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
          "model": type(trials[0][0][0]).__name__, "params": sum(p.numel() for p in trials[0][0][0].parameters()),
          "freeze": freeze, "trained_params": sum(p.numel() for p in trials[0][1].param_groups[0]["params"]),
          "by_threads": by_threads, "threads": int(best), "chunk_s": by_threads[best]["chunk_s"],
          "images_per_s": by_threads[best]["images_per_s"]}


# ------------------------------------------------------------------------------------------------------------
# The real age priors' architectures (issue 13): yu4u's WRN-16-8 and dlib's age ResNet, with PyTorch
# counterparts of the same architecture for the torch baseline (tests/test_port_wrn.py and test_port_onnx.py
# check that, with the same weights, they compute what the Flax modules compute).

AGE_PRIOR_MODELS = ("wrn16_8", "dlib_resnet10")


def age_prior_spec(model: str, conv_impl: str, quick: bool = False) -> dict[str, Any]:
  """Bench spec of a real age prior's architecture (--quick: a narrow, shallow member of the same family)."""
  if model == "wrn16_8":
    backbone = dict(depth=10, widen_factor=1) if quick else {}
  else:
    backbone = dict(width=1 / 8) if quick else {}
  return dict(arch=model, head="dex", backbone=dict(backbone, conv_impl=conv_impl))


def torch_wrn(depth: int = 16, widen_factor: int = 8, pool_size: int = 8, res: int = 64, num_classes: int = 101,
              bn_eps: float = 1e-3) -> Any:
  """agejax.models.wideresnet in PyTorch: TF-'SAME' stride-2 convs (bottom/right pad), yu4u's shortcut rule, an
  average pool that ignores padded cells, and a channels-last flatten so dense weights map one to one."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  from agejax.models.wideresnet import STEM_FEATURES, wrn_layout

  def conv(cin: int, cout: int, k: int, stride: int) -> nn.Module:
    c = nn.Conv2d(cin, cout, k, stride, padding=0 if stride > 1 or k == 1 else k // 2, bias=False)
    if stride == 1 or k == 1:
      return c
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), c)  # TF 'SAME' for a 3x3 stride-2 conv on even sides

  def bn(c: int) -> nn.Module:
    return nn.BatchNorm2d(c, eps=bn_eps, momentum=0.01)

  class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.bn1, self.conv1, self.bn2, self.conv2 = bn(cin), conv(cin, cout, 3, stride), bn(cout), conv(cout, cout, 3, 1)
      self.shortcut = conv(cin, cout, 1, stride) if cin != cout else None

    def forward(self, x):
      pre = F.relu(self.bn1(x))
      y = self.conv2(F.relu(self.bn2(self.conv1(pre))))
      return y + (self.shortcut(pre) if self.shortcut is not None else x)

  class WRN(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = conv(3, STEM_FEATURES, 3, 1)
      layout = wrn_layout(depth, widen_factor)
      self.blocks = nn.Sequential(*(Block(cin, cout, stride) for _, cin, cout, stride in layout))
      cout = layout[-1][2]
      self.final_bn = bn(cout)
      lo = (pool_size - 1) // 2
      self.pool_pad = (lo, pool_size - 1 - lo) * 2
      self.fc = nn.Linear((res // 4) ** 2 * cout, num_classes)

    def pool(self, x):
      k = self.pool_pad
      ones = torch.ones_like(x[:1, :1])
      x = F.avg_pool2d(F.pad(x, k), pool_size, 1) / F.avg_pool2d(F.pad(ones, k), pool_size, 1)
      return x.permute(0, 2, 3, 1).flatten(1)

    def stages(self):
      """[(stage name, module holding its weights, function)] as agejax.models.wideresnet names the stages."""
      blocks = [(name, block, block) for (name, *_), block in zip(wrn_layout(depth, widen_factor), self.blocks)]
      return [("stem", self.stem, self.stem), *blocks,
              ("final", self.final_bn, lambda x: F.relu(self.final_bn(x))), ("pool", None, self.pool)]

    def forward(self, x):
      x = F.relu(self.final_bn(self.blocks(self.stem(x))))
      return self.fc(self.pool(x))

  return WRN()


def torch_dlib(width: float = 1.0, num_classes: int = 81) -> Any:
  """agejax.models.dlib_resnet in PyTorch: convs with bias, per-channel affine layers, average-pool shortcuts
  zero-padded at the end (channels, rows, columns) like dlib's add_prev."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  from agejax.models.dlib_resnet import dlib_layout

  class Affine(nn.Module):
    def __init__(self, c: int):
      super().__init__()
      self.scale, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
      return x * self.scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

  def pad_to(x, c: int, h: int, w: int):
    return F.pad(x, (0, w - x.shape[3], 0, h - x.shape[2], 0, c - x.shape[1]))

  class Block(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool):
      super().__init__()
      self.down = down
      self.conv1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 0 if down else 1)
      self.affine1, self.conv2, self.affine2 = Affine(cout), nn.Conv2d(cout, cout, 3, 1, 1), Affine(cout)

    def forward(self, x):
      y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
      s = F.avg_pool2d(x, 2, 2) if self.down else x
      shape = [max(a, b) for a, b in zip(y.shape[1:], s.shape[1:], strict=True)]
      return F.relu(pad_to(y, *shape) + pad_to(s, *shape))

  class DlibNet(nn.Module):
    def __init__(self):
      super().__init__()
      stem, blocks = dlib_layout(width)
      self.stem_conv, self.stem_affine = nn.Conv2d(3, stem, 7, 2), Affine(stem)
      layers, cin = [], stem
      for _, cout, down in blocks:
        layers.append(Block(cin, cout, down))
        cin = max(cin, cout)
      self.blocks = nn.Sequential(*layers)
      self.fc = nn.Linear(cin, num_classes)

    def stem(self, x):
      return F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)

    def stages(self):
      """[(stage name, module holding its weights, function)] as agejax.models.dlib_resnet names the stages."""
      names = [name for name, _, _ in dlib_layout(width)[1]]
      return [("stem", nn.ModuleList([self.stem_conv, self.stem_affine]), self.stem),
              *((name, block, block) for name, block in zip(names, self.blocks)),
              ("pool", None, lambda x: x.mean(dim=(2, 3)))]

    def forward(self, x):
      return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

  return DlibNet()


def torch_age_prior(spec: dict[str, Any], res: int) -> Any:
  """The PyTorch counterpart of a wrn16_8 / dlib_resnet10 bench spec (101 outputs, like the bench's DEX head)."""
  b = spec.get("backbone", {})
  if spec["arch"] == "wrn16_8":
    return torch_wrn(b.get("depth", 16), b.get("widen_factor", 8), b.get("pool_size", 8), res,
                     spec.get("num_classes", 101))
  return torch_dlib(b.get("width", 1.0), spec.get("num_classes", 101))


# ------------------------------------------------------------------------------------------------------------
# Frozen-prefix trials (--freeze, agejax.engine.features): cached features vs the frozen stages recomputed.


def synthetic_pool(s: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
  """The bench's uint8 pool and ages (the same draws as `Setup`'s)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (s.pool, s.res, s.res, 3), dtype=np.uint8)
  return images, rng.uniform(1, 90, s.pool).astype(np.float32)


class FrozenSetup(Setup):
  """`Setup` for frozen-prefix trials: the tail trains on the cached features (`inputs` 'cached') or on the
  frozen stages recomputed every step ('recompute'), through the same trial programs."""

  def __init__(self, prior: Prior, frozen: "features_lib.FrozenPrefix", s: argparse.Namespace, inputs: str,
               cache: Any):
    self.s, self.prior, self.frozen, self.conv_plan = s, prior, frozen, None
    optim_cfg = ml_collections.ConfigDict(dict(name="caffe_sgd", base_lr=1e-4, momentum=0.9, weight_decay=5e-4,
                                               gamma=0.1, rules=CAFFE_VGG_RULES))
    self.optimizer = make_optimizer(optim_cfg, frozen.tail_variables["params"])
    step_cfg = trials_lib.StepConfig(s.batch, s.res)
    self.initial_state = frozen.initial_state(self.optimizer)
    ident = lambda x: x  # noqa: E731
    fn = frozen.cached_inputs if inputs == "cached" else frozen.recompute_inputs
    self.step = trials_lib.make_step(frozen.tail, "dex", ident, self.optimizer, step_cfg, fn)
    self.chunk = trials_lib.make_train_chunk(frozen.tail, "dex", ident, self.optimizer, step_cfg, fn)
    self.predict = trials_lib.make_predict(frozen.tail, "dex", ident)
    images, ages = synthetic_pool(s)
    self.pool_images = cache if inputs == "cached" else (jnp.asarray(images), prior.variables)
    self.pool_ages = jnp.asarray(ages)
    steps = s.steps * (s.repeats + 1)
    self.orders = np.stack([trials_lib.sample_order(np.arange(s.pool), steps, s.batch, t) for t in range(s.trials)])
    big = jnp.asarray(10**6, jnp.int32)
    self.hyper = trials_lib.Hyper(big, big)

  def memory(self) -> dict[str, Any]:
    state = self.state(0)
    est = memory_lib.estimate_trial_memory(self.frozen.tail, {"params": state.params,
                                                              "batch_stats": state.batch_stats},
                                           state.opt_state, self.s.batch, self.s.res, self.frozen.feature_shape,
                                           self.frozen.feature_dtype)
    return {"estimate_per_trial": est.to_dict(), "cache_bytes": self.frozen.cache_bytes(self.s.pool, 0)}


def run_freeze(s: argparse.Namespace) -> dict[str, Any]:
  """Frozen-prefix trials: images/s of the tail trained on cached features vs the frozen stages recomputed every
  step (both through the trial programs), vs a PyTorch loop doing the same partial fine-tuning."""
  impl = s.conv_impls[0]  # one convolution implementation for the prefix, the tail and the cache
  prior = bench_prior(s.model, [impl], s)[impl]
  prior, plan = tuned_prior(prior, s)
  frozen = features_lib.build_frozen(prior, s.freeze, {"crop": s.res, "mirror": True, "random_crop": True}, s.res,
                                     s.cached_crops, "--freeze")
  images, _ = synthetic_pool(s)
  t0 = time.perf_counter()
  cache = jnp.asarray(frozen.compute(images, frozen.view.variants(), s.batch, "bench features", progress=False))
  cache_s = time.perf_counter() - t0  # includes the prefix's compilation
  print(f"[bench] feature cache  {cache.shape} in {cache_s:.1f} s", file=sys.stderr, flush=True)
  images_per_chunk = s.trials * s.steps * s.batch
  results, memory, best = [], None, {}
  for inputs in ("cached", "recompute"):
    setup = FrozenSetup(prior, frozen, s, inputs, cache)
    memory = memory or setup.memory()
    for strategy in s.strategies:
      results.append(_timed(setup, {"inputs": inputs, "strategy": strategy, "conv_impl": impl}, images_per_chunk,
                            f"{inputs:9s} {strategy:5s}"))
    ok = [r for r in results if r["inputs"] == inputs and "images_per_s" in r]
    best[inputs] = max(ok, key=lambda r: r["images_per_s"]) if ok else None
    del setup
  torch_result = None
  if s.torch:
    try:
      torch_result = torch_reference(model_spec(s.model, "lax", s.quick), s, s.freeze)
      print(f"[bench] torch partial {torch_result['images_per_s']:9.1f} images/s", file=sys.stderr, flush=True)
    except ImportError as e:
      torch_result = {"error": f"torch not importable: {e}"}
  torch_ips = (torch_result or {}).get("images_per_s")
  cached, recompute = (best[k]["images_per_s"] if best[k] else None for k in ("cached", "recompute"))
  import flax
  import jaxlib

  return {
      "device": device_info(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "flax": flax.__version__, "numpy": np.__version__},
      "settings": {"model": s.model, "spec": model_spec(s.model, "lax", s.quick), "quick": s.quick,
                   "freeze": s.freeze, "cached_crops": s.cached_crops, "variants": frozen.view.num_variants,
                   "feature_shape": list(frozen.feature_shape), "trials": s.trials, "res": s.res, "batch": s.batch,
                   "steps_per_chunk": s.steps, "repeats": s.repeats, "pool": s.pool,
                   "strategies": list(s.strategies), "conv_impl": impl, "images_per_chunk": images_per_chunk,
                   "optimizer": "caffe_sgd momentum 0.9, VGG lr rules", "dtype": "float32"},
      "conv_plan": plan,
      "cache": {"seconds": cache_s, "images": s.pool * frozen.view.num_variants,
                "images_per_s": s.pool * frozen.view.num_variants / cache_s, "bytes": int(cache.nbytes)},
      "results": results,
      "best": {k: ({f: v[f] for f in ("strategy", "images_per_s")} if v else None) for k, v in best.items()},
      "memory": memory,
      "torch": torch_result,
      "ratio_cached_vs_recompute": cached / recompute if cached and recompute else None,
      "ratio_cached_vs_torch": cached / torch_ips if cached and torch_ips else None,
      "ratio_recompute_vs_torch": recompute / torch_ips if recompute and torch_ips else None,
      "protocol_grid": protocol_grid(cached, s.protocol),
  }


def protocol_grid(images_per_s: float | None, protocol: str = "lap") -> dict[str, Any]:
  """What a paper protocol's full grid (every size, every trial; agejax.configs.PAPER_SOLVERS) trains: per size
  n its trials, steps (max_iter) and images (trials x steps x the configs' batch), and in total, with the
  seconds that takes at `images_per_s` (training only: no evaluation, compilation or feature cache)."""
  batch = int(base_config().batch_size)
  rows = [{"n": n, "trials": trials, "steps": max_iter, "images": trials * max_iter * batch}
          for n, trials, _, max_iter in solver_sizes(PAPER_SOLVERS[protocol])]
  total = sum(r["images"] for r in rows)
  for r in rows:
    r["est_s"] = r["images"] / images_per_s if images_per_s else None
  return {"protocol": protocol, "batch": batch, "sizes": rows, "trials": sum(r["trials"] for r in rows),
          "images": total, "images_per_s": images_per_s,
          "est_s": total / images_per_s if images_per_s else None,
          "est_h": total / images_per_s / 3600 if images_per_s else None}


def run(s: argparse.Namespace) -> dict[str, Any]:
  """Runs the benchmark described by parsed arguments; returns the JSON-ready report."""
  images_per_chunk = s.trials * s.steps * s.batch
  results, flops, plans = [], {}, {}
  impls = list(dict.fromkeys([*s.conv_impls, *(["lax"] if s.sequential else [])]))
  priors = bench_prior(s.model, impls, s)
  peak = peak_flops(jax.devices()[0].device_kind, s.dtype, s.peak_tflops)
  sequential, memory = None, None
  for impl in impls:
    setup = Setup(priors[impl], s)
    plans[impl] = setup.conv_plan
    if memory is None:
      memory = setup.memory()
    impl_results = []
    if impl == "lax" and s.sequential:
      sequential = {"strategy": "sequential", "conv_impl": "lax", **setup.time_sequential()}
      sequential["images_per_s"] = images_per_chunk / sequential["chunk_s"]
      print(f"[bench] sequential steps {sequential['images_per_s']:9.1f} images/s", file=sys.stderr, flush=True)
    for strategy in s.strategies if impl in s.conv_impls else ():
      impl_results.append(_timed(setup, {"strategy": strategy, "conv_impl": impl}, images_per_chunk,
                                 f"{strategy:5s} {impl:9s}"))
    flops[impl] = setup.flops_per_step()  # after the strategies: with --steps 1 it reuses the 'loop' program
    for entry in impl_results + ([sequential] if sequential and impl == "lax" else []):
      if "images_per_s" in entry:
        entry["flops_per_step"] = flops[impl]
        achieved = flops[impl] * s.trials * s.steps / entry["chunk_s"] if flops[impl] else None
        entry["achieved_flops_per_s"] = achieved
        entry["mfu"] = achieved / peak if achieved and peak else None
    results += impl_results
    del setup

  ok = [r for r in results if "images_per_s" in r]
  base = next((r["images_per_s"] for r in ok if r["strategy"] == "loop" and r["conv_impl"] == "lax"), None)
  for r in ok:
    r["speedup_vs_loop_lax"] = r["images_per_s"] / base if base else None
  best = max(ok, key=lambda r: r["images_per_s"]) if ok else None
  # What the engine runs by default: the per-layer 'auto' plan and the fastest strategy on it.
  auto_rows = [r for r in ok if r["conv_impl"] == "auto"]
  chosen = max(auto_rows, key=lambda r: r["images_per_s"]) if auto_rows else best

  torch_result, ratio = None, None
  if s.torch:
    try:
      torch_result = torch_reference(model_spec(s.model, "lax", s.quick), s)
      print(f"[bench] torch loop     {torch_result['images_per_s']:9.1f} images/s", file=sys.stderr, flush=True)
    except ImportError as e:
      torch_result = {"error": f"torch not importable: {e}"}
    if best and "images_per_s" in torch_result:
      ratio = best["images_per_s"] / torch_result["images_per_s"]
  torch_ips = (torch_result or {}).get("images_per_s")

  import flax
  import jaxlib

  return {
      "device": device_info(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "flax": flax.__version__, "numpy": np.__version__},
      "settings": {"model": s.model, "spec": model_spec(s.model, "lax", s.quick), "quick": s.quick,
                   "trials": s.trials, "res": s.res, "crop": s.res, "batch": s.batch, "steps_per_chunk": s.steps,
                   "repeats": s.repeats, "pool": s.pool, "trial_chunk": s.trial_chunk,
                   "strategies": list(s.strategies), "conv_impls": list(s.conv_impls),
                   "images_per_chunk": images_per_chunk, "optimizer": "caffe_sgd momentum 0.9, VGG lr rules",
                   "dtype": s.dtype},
      "flops_per_step": flops,
      "results": results,
      "best": {k: best[k] for k in ("strategy", "conv_impl", "images_per_s")} if best else None,
      "chosen": {k: chosen[k] for k in ("strategy", "conv_impl", "images_per_s")} if chosen else None,
      "conv_plans": {impl: plan for impl, plan in plans.items() if plan},
      "sequential": sequential,
      "memory": memory,
      "peak_flops_per_s": peak,
      "torch": torch_result,
      "ratio_best_jax_vs_torch": ratio,
      "ratio_chosen_vs_torch": chosen["images_per_s"] / torch_ips if chosen and torch_ips else None,
      "ratio_chosen_vs_sequential": (chosen["images_per_s"] / sequential["images_per_s"]
                                     if chosen and sequential else None),
      "protocol_grid": protocol_grid(chosen["images_per_s"] if chosen else None, s.protocol),
  }


def _csv(value: str, allowed: Sequence[str]) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  bad = [v for v in items if v not in allowed]
  if bad or not items:
    raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}; got {value!r}")
  return items


def _ints(value: str) -> list[int]:
  try:
    items = [int(v) for v in value.split(",") if v.strip()]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected a comma list of integers; got {value!r}") from e
  if not items or min(items) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers; got {value!r}")
  return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help="a tiny setting for smoke runs and the tests (tiny VGG-16, few trials and steps), mostly "
                       "compiling: 94 s on 2 CPU cores with every conv impl and strategy, ~23 s with --conv-impls lax")
  ap.add_argument("--model", default="vgg16_tiny", choices=MODELS)
  ap.add_argument("--trials", type=int, help=f"default {DEFAULTS['trials']} ({QUICK['trials']} with --quick)")
  ap.add_argument("--res", type=int, help="image side in pixels (no crop margin)")
  ap.add_argument("--batch", type=int)
  ap.add_argument("--steps", type=int, help="SGD steps per timed chunk (K)")
  ap.add_argument("--repeats", type=int, help="timed chunks after the first call; the best is reported")
  ap.add_argument("--pool", type=int, help="synthetic pool images the batches are drawn from")
  ap.add_argument("--trial-chunk", type=int, default=0, help="trials vectorised together (0: all)")
  ap.add_argument("--strategies", type=lambda v: _csv(v, trials_lib.STRATEGIES), default=list(trials_lib.STRATEGIES))
  ap.add_argument("--conv-impls", type=lambda v: _csv(v, CONV_IMPLS), default=list(CONV_IMPLS))
  ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                  help="also time a PyTorch loop over the same trials (when torch is importable)")
  ap.add_argument("--torch-threads", type=_ints, default=None,
                  help="comma list of torch intra-op thread counts to time (default: all cores and 1)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="compute dtype (bfloat16: bf16 compute, float32 master weights)")
  ap.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                  help="also time the hand-written baseline: one jitted step per call, trials one by one")
  ap.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (known GPUs/TPUs are built in)")
  ap.add_argument("--cpu-devices", type=int, default=0,
                  help="CPU devices to make (0: one per core, up to 8, as the engine; 1: a single device). "
                       "The strategies spread the trials over all devices; the sequential baseline uses one")
  ap.add_argument("--freeze", default="none",
                  help="frozen-prefix trials: 'backbone' (head only) or a stage name (wrn16_8 / dlib_resnet10); "
                       "times cached features vs the frozen stages recomputed, and a torch partial fine-tuning loop")
  ap.add_argument("--cached-crops", type=int, default=0, help="crop offsets cached per axis with --freeze")
  ap.add_argument("--protocol", default="lap", choices=sorted(PAPER_SOLVERS),
                  help="the paper protocol whose full grid `protocol_grid` costs at the measured images/s")
  ap.add_argument("--out", help="also write the JSON here")
  s = ap.parse_args(argv)
  for key, value in (QUICK if s.quick else DEFAULTS).items():
    if getattr(s, key) is None:
      setattr(s, key, value)
  if s.torch_threads is None:
    s.torch_threads = sorted({os.cpu_count() or 1, 1}, reverse=True)
  if min(s.trials, s.res, s.batch, s.steps, s.repeats, s.pool) < 1:
    ap.error("--trials, --res, --batch, --steps, --repeats and --pool must be positive")
  return s


def main(argv: Sequence[str] | None = None) -> None:
  s = parse_args(argv)
  maybe_initialize(s.cpu_devices)
  report = run_freeze(s) if s.freeze != "none" else run(s)
  text = json.dumps(report, indent=1)
  print(text)
  if s.out:
    os.makedirs(os.path.dirname(os.path.abspath(s.out)), exist_ok=True)
    with open(s.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
