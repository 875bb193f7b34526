"""Frozen-prefix trials (`config.trials.freeze`): the frozen layers run once per image, the trials train the rest.

`freeze` is 'none' (every layer trains), 'backbone' (only the head trains) or the name of a backbone stage
(agejax.models.stages): the stages before it are frozen. The frozen prefix runs in inference mode (BatchNorm
statistics untouched) on every pool image in every augmentation variant the cache keeps: crop offsets
`crop_offsets` per axis (`trials.cached_crops`: 0 or 1 the centre only, -1 every offset) times the mirror,
and on the centre crop of every test image. Its outputs replace the uint8 images on the device, and every
trial trains a `TailModel` (the stages from the frozen one on, and the head) through the same trial programs.

A training sample draws its crop offsets and mirror with the same key and calls as `trials.augment`, and
takes the cached variant nearest that offset: with every offset cached it sees what the image augmentation
would give. `recompute_inputs` is the same choice with the frozen layers recomputed each step (no cache).
"""

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm import tqdm

from agejax.engine import memory as memory_lib
from agejax.engine.step import TrialState, make_initial_state
from agejax.errors import ConfigError

log = logging.getLogger(__name__)

NONE, BACKBONE = "none", "backbone"


class TailModel(nn.Module):
  """The trained part of a frozen-prefix model: backbone stages from `start` on (None: none), then the head.

  Its parameters keep the full model's paths ('backbone/<stage>/...', 'head/...'), so optimiser rules match."""

  backbone: nn.Module
  head: nn.Module
  start: str | None = None

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.start is not None:
      x = self.backbone(x, train=train, start=self.start)
    return self.head(x, train=train)


def stage_names(backbone: nn.Module) -> tuple[str, ...]:
  """A staged backbone's stage names (empty for one without stages)."""
  return tuple(backbone.stage_names()) if hasattr(backbone, "stage_names") else ()


def check_freeze(freeze: Any, backbone: nn.Module, where: str = "config.trials.freeze") -> str:
  """`freeze` validated against a backbone; a one-line ConfigError names the valid values."""
  names = stage_names(backbone)
  valid = (NONE, BACKBONE, *names[1:])  # freezing before the first stage would freeze nothing
  if freeze not in valid:
    kind = type(backbone).__name__
    stages = f"or a stage of {kind}: {', '.join(names[1:])}" if names else f"({kind} has no named stages)"
    raise ConfigError(f"{where}={freeze!r}: expected 'none', 'backbone' {stages}")
  return freeze


def crop_offsets(side: int, crop: int, random_crop: bool, cached_crops: int) -> tuple[int, ...]:
  """The crop offsets (per axis) the cache keeps: the centre, every offset, or `cached_crops` evenly spaced."""
  margin = side - crop
  if margin < 0:
    raise ConfigError(f"config.data.crop={crop} exceeds the {side} px images")
  if not random_crop or margin == 0 or cached_crops in (0, 1):
    return (margin // 2,)
  if cached_crops < 0 or cached_crops > margin:
    return tuple(range(margin + 1))
  return tuple(sorted({int(v) for v in np.round(np.linspace(0, margin, cached_crops))}))


@dataclasses.dataclass(frozen=True)
class View:
  """How a training sample sees a pool image: crop side, which offsets are cached, mirror, random crop."""

  side: int
  crop: int
  offsets: tuple[int, ...]
  mirror: bool
  random_crop: bool

  @property
  def flips(self) -> int:
    return 2 if self.mirror else 1

  @property
  def num_variants(self) -> int:
    return len(self.offsets) ** 2 * self.flips

  def variants(self) -> list[tuple[int, int, bool]]:
    """(y offset, x offset, mirrored) of variant v = (iy * len(offsets) + ix) * flips + flip."""
    return [(oy, ox, bool(f)) for oy in self.offsets for ox in self.offsets for f in range(self.flips)]

  def choose(self, key: jax.Array, b: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(iy, ix, flip) per sample: `augment`'s draws (same key, same calls), snapped to the cached offsets."""
    k_y, k_x, k_f = jax.random.split(key, 3)
    offsets = jnp.asarray(self.offsets)

    def nearest(k):
      if not self.random_crop or len(self.offsets) == 1:
        return jnp.zeros((b,), jnp.int32)
      o = jax.random.randint(k, (b,), 0, self.side - self.crop + 1)
      return jnp.argmin(jnp.abs(o[:, None] - offsets[None]), axis=1).astype(jnp.int32)

    flip = jax.random.bernoulli(k_f, 0.5, (b,)).astype(jnp.int32) if self.mirror else jnp.zeros((b,), jnp.int32)
    return nearest(k_y), nearest(k_x), flip

  def variant_index(self, key: jax.Array, b: int) -> jax.Array:
    iy, ix, flip = self.choose(key, b)
    return (iy * len(self.offsets) + ix) * self.flips + flip


def view_of(data_cfg: Mapping[str, Any], side: int, cached_crops: int) -> View:
  crop, random_crop = int(data_cfg["crop"]), bool(data_cfg["random_crop"])
  return View(side, crop, crop_offsets(side, crop, random_crop, int(cached_crops)), bool(data_cfg["mirror"]),
              random_crop)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


@dataclasses.dataclass
class FrozenPrefix:
  """A prior split at `freeze`: the frozen prefix (run on images) and the tail that trials train."""

  freeze: str
  model: Any  # the prior's full AgeModel
  variables: Any  # the prior's full variables (the prefix reads its part)
  preprocess: Callable[[jax.Array], jax.Array]
  view: View
  new_head: bool
  tail: TailModel = dataclasses.field(init=False)
  tail_variables: Any = dataclasses.field(init=False)
  feature_shape: tuple[int, ...] = dataclasses.field(init=False)
  feature_dtype: Any = dataclasses.field(init=False)
  device_bytes: int = 0  # of its cache, when that is on the device

  def __post_init__(self):
    stop = None if self.freeze == BACKBONE else self.freeze
    self._stop = stop
    self.tail = TailModel(self.model.backbone, self.model.head, start=stop)
    x = jax.ShapeDtypeStruct((1, self.view.crop, self.view.crop, 3), jnp.uint8)
    out = jax.eval_shape(self.prefix, self.variables, x)
    self.feature_shape, self.feature_dtype = tuple(out.shape[1:]), out.dtype
    f = jax.ShapeDtypeStruct((1, *self.feature_shape), self.feature_dtype)
    shapes = jax.eval_shape(lambda x: self.tail.init(jax.random.key(0), x), f)
    full = {c: _flat(v) for c, v in self.variables.items()}
    self.tail_variables = {c: flax.traverse_util.unflatten_dict({k: full[c][k] for k in _flat(v)})
                           for c, v in shapes.items()}
    self.head_dim = int(np.prod(jax.eval_shape(
        lambda v, x: self.model.apply(v, x, method=lambda m, x: m.backbone(x, train=False)),
        self.variables, jax.ShapeDtypeStruct(x.shape, jnp.float32)).shape[1:]))

  def prefix(self, variables: Any, images: jax.Array) -> jax.Array:
    """The frozen stages in inference mode on uint8 crops (B, crop, crop, 3)."""
    stop = self._stop
    x = self.preprocess(images)
    if stop is None:
      return self.model.apply(variables, x, method=lambda m, x: m.backbone(x, train=False))
    return self.model.apply(variables, x, method=lambda m, x: m.backbone(x, train=False, stop=stop))

  # -- trial pieces ---------------------------------------------------------------------------------
  def cached_inputs(self, key: jax.Array, cache: jax.Array, idx: jax.Array) -> jax.Array:
    """A batch's features from the pool cache (N, V, ...): each sample's variant as `augment` would pick it."""
    return cache[idx, self.view.variant_index(key, idx.shape[0])]

  def recompute_inputs(self, key: jax.Array, pool: tuple[jax.Array, Any], idx: jax.Array) -> jax.Array:
    """The same batch with the frozen stages recomputed: `pool` is (uint8 images, the prior's variables)."""
    images, variables = pool
    iy, ix, flip = self.view.choose(key, idx.shape[0])
    offsets, crop = jnp.asarray(self.view.offsets), self.view.crop
    crops = jax.vmap(lambda im, y, x: lax.dynamic_slice(im, (y, x, 0), (crop, crop, im.shape[-1])))(
        images[idx], offsets[iy], offsets[ix])
    crops = jnp.where(flip[:, None, None, None] > 0, crops[:, :, ::-1], crops)
    return lax.stop_gradient(self.prefix(variables, crops))

  def draw_head(self, variables: Any, key: jax.Array) -> Any:
    """A new head's parameters over the tail's features, drawn exactly as the full model's."""
    del variables  # the head's shape comes from the prefix's feature size
    return self.model.head.init(key, jnp.zeros((1, self.head_dim)))["params"]

  def initial_state(self, tx: optax.GradientTransformation) -> Callable[[int], TrialState]:
    """seed -> a trial's starting state over the tail's variables (`step.make_initial_state`)."""
    start = make_initial_state(tx, self.draw_head if self.new_head else None)
    return lambda seed: start(self.tail_variables, seed)

  def complete(self, variables: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's tail variables merged into the prior's, so a trial saves as a whole prior directory."""
    out = {c: _flat(v) for c, v in self.variables.items()}
    for c, v in variables.items():
      out.setdefault(c, {}).update(_flat(v))
    return {c: flax.traverse_util.unflatten_dict(v) for c, v in out.items()}

  # -- the cache ------------------------------------------------------------------------------------
  def cache_bytes(self, num_pool: int, num_test: int) -> int:
    return memory_lib.feature_cache_bytes(num_pool * self.view.num_variants + num_test, self.feature_shape,
                                          self.feature_dtype)

  def compute(self, images: np.ndarray, variants: list[tuple[int, int, bool]], batch: int,
              desc: str = "features", progress: bool = True) -> np.ndarray:
    """Host array (N, len(variants), ...) of the prefix on every image in every variant, `batch` at a time."""
    n = len(images)
    out = np.empty((n, len(variants), *self.feature_shape), self.feature_dtype)
    run = jax.jit(self.prefix)
    crop = self.view.crop
    with tqdm(total=n * len(variants), desc=desc, unit="image", disable=not progress, leave=False) as bar:
      for v, (oy, ox, flip) in enumerate(variants):
        for i in range(0, n, batch):
          chunk = np.asarray(images[i:i + batch, oy:oy + crop, ox:ox + crop])
          if flip:
            chunk = chunk[:, :, ::-1]
          m = len(chunk)
          if m < batch:  # one shape, one compilation
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - m, axis=0)])
          out[i:i + m, v] = np.asarray(run(self.variables, jnp.asarray(chunk)))[:m]
          bar.update(m)
    return out


def build_frozen(prior: Any, freeze: str, data_cfg: Mapping[str, Any], side: int, cached_crops: int = 0,
                 where: str = "config.trials.freeze") -> FrozenPrefix:
  """The frozen split of a resolved prior (agejax.experiments.priors.Prior) for a data view."""
  check_freeze(freeze, prior.model.backbone, where)
  if freeze == NONE:
    raise ValueError("build_frozen needs a freeze other than 'none'")
  return FrozenPrefix(freeze, prior.model, prior.variables, prior.preprocess, view_of(data_cfg, side, cached_crops),
                      prior.new_head)


def compute_cache(frozen: FrozenPrefix, pool_images: np.ndarray, test_images: np.ndarray, batch: int,
                  budget_bytes: int | None, other_bytes: int = 0, progress: bool = True,
                  name: str = "prior") -> dict[str, Any]:
  """{'pool_images': (N, V, ...) features, 'test_images': (Q, ...)}, on the device when they fit
  `budget_bytes` (with `other_bytes` already used) and in host memory (numpy) otherwise."""
  view = frozen.view
  need = frozen.cache_bytes(len(pool_images), len(test_images))
  on_device = not budget_bytes or need <= budget_bytes * memory_lib.SAFETY - other_bytes
  (log.info if on_device else log.warning)(
      "prior %s: caching freeze=%s features %s x %d variants of %d pool + %d test images (%.1f MB) %s", name,
      frozen.freeze, frozen.feature_shape, view.num_variants, len(pool_images), len(test_images), need / 2**20,
      "on the device" if on_device else "in HOST memory (it does not fit the device budget): chunks copy their rows")
  pool = frozen.compute(pool_images, view.variants(), batch, f"{name} features (pool)", progress)
  centre = (view.side - view.crop) // 2
  test = frozen.compute(test_images, [(centre, centre, False)], batch, f"{name} features (test)", progress)[:, 0]
  if on_device:
    return {"pool_images": jnp.asarray(pool), "test_images": jnp.asarray(test), "on_device": True}
  return {"pool_images": pool, "test_images": test, "on_device": False}


def take_rows(pool: Any, batch_idx: np.ndarray) -> tuple[Any, np.ndarray]:
  """(pool, batch_idx) as a chunk's program takes them: a host cache sends only the rows `batch_idx` uses
  (padded to a fixed count, so one program serves every chunk), with the indices remapped."""
  if not isinstance(pool, np.ndarray):
    return pool, batch_idx
  rows = np.unique(batch_idx)
  size = min(len(pool), int(np.size(batch_idx)))
  rows = np.concatenate([rows, np.repeat(rows[-1:], size - len(rows))])
  return jnp.asarray(pool[rows]), np.searchsorted(rows, batch_idx).astype(np.int32)
