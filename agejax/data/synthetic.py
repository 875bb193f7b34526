"""A procedurally generated "age" dataset for the demo and tests (synthetic: no real faces).

Each image is a noisy background with a bright disk ("a face") whose radius grows with the label and
horizontal stripes ("wrinkles") whose count grows with it, at a random position and contrast, so the
label can be learned from the pixels but not from one pixel. `skew` tilts the age distribution, which
lets a source and a target differ the way IMDB and LAP do.
"""

import numpy as np


def synthetic_ages(n: int, seed: int, max_age: int = 80, skew: float = 0.0) -> np.ndarray:
  """Integer ages in 0..max_age; skew > 0 favours the young, < 0 the old."""
  rng = np.random.default_rng([seed, 1])
  u = rng.random(n)
  if skew:
    u = u ** np.exp(skew)
  return np.floor(u * (max_age + 1)).astype(np.float32)


def render_faces(ages: np.ndarray, size: int, seed: int, max_age: int = 80) -> np.ndarray:
  """uint8 RGB images (N, size, size, 3) drawn from the labels."""
  rng = np.random.default_rng([seed, 2])
  n = len(ages)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  t = np.asarray(ages, np.float32)[:, None, None] / max_age
  cy = 0.5 + rng.uniform(-0.12, 0.12, (n, 1, 1))
  cx = 0.5 + rng.uniform(-0.12, 0.12, (n, 1, 1))
  radius = 0.18 + 0.22 * t
  disk = (((yy - cy) ** 2 + (xx - cx) ** 2) < radius ** 2).astype(np.float32)
  stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (1 + 7 * t) * (yy - cy) / (2 * radius))
  contrast = rng.uniform(0.6, 1.0, (n, 1, 1))
  face = disk * contrast * (0.55 + 0.45 * stripes * np.clip(t * 1.5, 0.2, 1.0))
  background = rng.uniform(0.0, 0.35, (n, 1, 1)) + rng.normal(0, 0.08, (n, size, size))
  gray = np.clip(np.where(disk > 0, face, background), 0, 1)
  tint = rng.uniform(0.8, 1.0, (n, 1, 1, 3)).astype(np.float32)
  return (np.clip(gray[..., None] * tint, 0, 1) * 255).astype(np.uint8)


def synthetic_dataset(n: int, size: int, seed: int, max_age: int = 80, skew: float = 0.0
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (n, size, size, 3), ages float32 (n,)), deterministic in `seed`."""
  ages = synthetic_ages(n, seed, max_age, skew)
  return render_faces(ages, size, seed, max_age), ages
