"""Grain loader: sharding, seeded order, exact resume from a saved state, reproducible augmentation."""

import numpy as np
import pytest
from PIL import Image

from agejax.data.pipeline import center_crop_transform, compose, crop_and_mirror, make_loader, random_crop, random_flip

N = 20


def _data(n=N, h=4):
  """Images whose every pixel holds the element index (so labels can be checked against images)."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, h, h, 3)).copy()
  images[:, :, 0, 0] = 200  # a marked left column, to see mirroring
  return images, np.arange(n, dtype=np.int32)


def _labels(it, steps=None):
  out = []
  for k, b in enumerate(it):
    if steps is not None and k == steps:
      break
    out.append(b["label"])
  return np.concatenate(out)


def test_batches_pair_images_with_labels():
  images, labels = _data()
  b = next(make_loader(images, labels, batch_size=4, seed=0))
  assert b["image"].shape == (4, 4, 4, 3) and b["image"].dtype == np.uint8 and b["label"].shape == (4,)
  np.testing.assert_array_equal(b["image"][:, 1, 1, 0], b["label"])


def test_two_shards_are_disjoint_and_cover():
  images, labels = _data()
  kw = dict(batch_size=5, seed=3, num_epochs=1, shard_count=2)
  s0 = _labels(make_loader(images, labels, shard_index=0, **kw))
  s1 = _labels(make_loader(images, labels, shard_index=1, **kw))
  assert len(s0) == len(s1) == N // 2
  assert not set(s0) & set(s1) and set(s0) | set(s1) == set(range(N))


def test_uneven_shards_equalised_when_dropping_remainder():
  images, labels = _data(21)
  kw = dict(batch_size=1, seed=3, num_epochs=1, shard_count=2)
  s = [_labels(make_loader(images, labels, shard_index=i, **kw)) for i in range(2)]
  assert len(s[0]) == len(s[1]) == 10 and not set(s[0]) & set(s[1])
  full = [_labels(make_loader(images, labels, shard_index=i, drop_remainder=False, **kw)) for i in range(2)]
  assert set(full[0]) | set(full[1]) == set(range(21))


def test_seed_controls_order_and_epochs_reshuffle():
  images, labels = _data()
  a = _labels(make_loader(images, labels, batch_size=5, seed=1, num_epochs=2))
  b = _labels(make_loader(images, labels, batch_size=5, seed=1, num_epochs=2))
  c = _labels(make_loader(images, labels, batch_size=5, seed=2, num_epochs=2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert sorted(a[:N]) == sorted(a[N:]) == list(range(N)) and not np.array_equal(a[:N], a[N:])
  plain = _labels(make_loader(images, labels, batch_size=5, seed=1, num_epochs=1, shuffle=False))
  np.testing.assert_array_equal(plain, np.arange(N))


def test_resume_from_state_is_exact():
  images, labels = _data()
  kw = dict(batch_size=3, seed=7, transform=random_flip)  # infinite, so resuming crosses epochs
  it = make_loader(images, labels, **kw)
  for _ in range(4):
    next(it)
  state = it.get_state()
  rest = [next(it) for _ in range(9)]
  fresh = make_loader(images, labels, **kw)
  fresh.set_state(state)
  for want in rest:
    got = next(fresh)
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["image"], want["image"])
  from_start = make_loader(images, labels, **kw)
  assert not np.array_equal(next(from_start)["label"], rest[0]["label"])


def test_random_flip_is_seeded_per_element():
  images, labels = _data()
  kw = dict(batch_size=N, seed=5, num_epochs=1, transform=random_flip)
  a, b = next(make_loader(images, labels, **kw)), next(make_loader(images, labels, **kw))
  np.testing.assert_array_equal(a["image"], b["image"])
  flipped = a["image"][:, 0, -1, 0] == 200
  kept = a["image"][:, 0, 0, 0] == 200
  assert np.all(flipped ^ kept) and 0 < flipped.sum() < N
  # other shards do not repeat this shard's coin flips position by position
  s1 = next(make_loader(images, labels, shard_index=1, shard_count=2, **{**kw, "batch_size": N // 2}))
  s0 = next(make_loader(images, labels, shard_index=0, shard_count=2, **{**kw, "batch_size": N // 2}))
  assert not np.array_equal(s0["image"][:, 0, -1, 0] == 200, s1["image"][:, 0, -1, 0] == 200)


def test_crop_transforms():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
  assert crop_and_mirror(224)(img, rng).shape == (224, 224, 3)
  np.testing.assert_array_equal(center_crop_transform(224)(img, rng), img[16:240, 16:240])
  small = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  corners = {tuple(random_crop(small, rng, 6)[0, 0]) for _ in range(200)}
  assert len(corners) == 9  # offsets 0..2 in each direction, all reached
  with pytest.raises(ValueError):
    random_crop(small, rng, 9)
  both = compose(lambda x, r: x + 1, lambda x, r: x * 2)
  assert both(np.ones((1, 1, 3), np.uint8), rng)[0, 0, 0] == 4


def test_paths_are_decoded_and_resized(tmp_path):
  paths = []
  for i, (h, w) in enumerate([(10, 12), (20, 8), (9, 9), (16, 16)]):
    p = str(tmp_path / f"{i}.png")
    Image.fromarray(np.full((h, w, 3), i * 50, np.uint8)).save(p)
    paths.append(p)
  b = next(make_loader(paths, np.arange(4), batch_size=4, seed=0, num_epochs=1, shuffle=False, image_size=8))
  assert b["image"].shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(b["image"][:, 4, 4, 0], [0, 50, 100, 150])


def test_rejects_bad_arguments():
  images, labels = _data()
  with pytest.raises(ValueError, match="labels"):
    make_loader(images, labels[:-1], batch_size=2, seed=0)
  with pytest.raises(ValueError, match="shard_index"):
    make_loader(images, labels, batch_size=2, seed=0, shard_index=2, shard_count=2)


def test_array_and_path_sources_give_the_same_batches(tmp_path):
  images, labels = _data(12)
  paths = []
  for i, img in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(img).save(paths[-1])
  kw = dict(batch_size=5, seed=11, num_epochs=2, transform=random_flip, drop_remainder=False)
  from_array = list(make_loader(images, labels, **kw))
  from_paths = list(make_loader(paths, labels, **kw))
  assert len(from_array) == len(from_paths) == 5 and len(from_array[-1]["label"]) == 4
  for a, b in zip(from_array, from_paths, strict=True):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])


def test_explicit_indices_are_read_in_order_and_resume():
  images, labels = _data()
  stream = np.random.default_rng(0).integers(0, N, 24)
  kw = dict(batch_size=4, seed=0, indices=stream, shard_index=1, shard_count=2, num_epochs=3)
  got = _labels(make_loader(images, labels, **kw))
  np.testing.assert_array_equal(got, stream)  # the whole stream, whatever the shard or epoch settings
  it = make_loader(images, labels, **kw)
  next(it), next(it)
  state = it.get_state()
  fresh = make_loader(images, labels, **kw)
  fresh.set_state(state)
  np.testing.assert_array_equal(_labels(fresh), stream[8:])
  with pytest.raises(ValueError, match="indices"):
    make_loader(images, labels, batch_size=4, seed=0, indices=[0, N])
