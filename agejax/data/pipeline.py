"""Host-side Grain input pipeline for datasets too big to keep on the device (IMDB-WIKI, the transfer study).

make_loader builds: element indices -> shuffle(seed) -> this process's shard -> repeat -> read + per-element
transform -> batch, with threaded prefetch, and returns a grain DatasetIterator whose get_state()/set_state()
resume exactly. Transforms are `(image, rng) -> image` on uint8 HWC numpy arrays. With `indices` (an element
stream drawn elsewhere, e.g. `engine.orders.sample_order`) it reads exactly that stream instead; the
single-model trainer (`agejax.engine.fit`) reads a training set too big for the device that way.
"""

from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

from agejax.data.images import ResizeMode, center_crop, decode_image, resize_image

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _element_rng(transform_seed: int, position: int) -> np.random.Generator:
  return np.random.default_rng([transform_seed, position])


def _shard_seed(seed: int, shard_index: int) -> int:
  """Transform seed per shard, so two processes do not draw the same augmentations for their k-th elements."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def _index_stream(n: int, seed: int, shuffle: bool, num_epochs: int | None, shard_index: int, shard_count: int,
                  drop_remainder: bool) -> grain.MapDataset:
  """The element indices this shard reads: per-epoch shuffles of range(n), split by stride, repeated."""
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds[shard_index:(n - n % shard_count if drop_remainder else n):shard_count]
  return ds if num_epochs == 1 else ds.repeat(num_epochs)


def make_loader(images_or_paths: np.ndarray | Sequence[str], labels: np.ndarray, *, batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None, shard_index: int | None = None,
                shard_count: int | None = None, transform: Transform | None = None, drop_remainder: bool = True,
                image_size: int | None = None, resize: ResizeMode = "squash", num_threads: int = 4,
                prefetch: int = 4, indices: np.ndarray | None = None) -> grain.DatasetIterator:
  """Iterator of batches {'image': (B, H, W, 3), 'label': (B, ...)} for this process.

  images_or_paths: an (N, H, W, 3) array (e.g. the memory map from cache.load_images), gathered a batch at a
    time, or N vetted image paths, decoded per element in `num_threads` threads (give `image_size` unless all
    images share one size; a bad file raises DatasetError). Both give the same batches for the same seed.
  Shards default to jax.process_index()/jax.process_count(); each epoch is shuffled (differently per epoch)
  over the whole dataset and then split by stride, so shards are disjoint and together cover the epoch. With
  drop_remainder and several shards the last N % shard_count elements of each epoch are dropped, so every
  process makes the same number of steps. num_epochs=None repeats forever; with more than one epoch a batch
  may hold the end of one epoch and the start of the next. `transform(image, rng)` gets a generator seeded by
  (seed, shard, position in this shard's stream): reproducible, resumable, and different in every epoch.
  `prefetch` is in batches. `indices`: the element indices to read, in order (every process reads all of
  them; `shuffle`, the shards and `num_epochs` do not apply).
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  if len(images_or_paths) != len(labels):
    raise ValueError(f"{len(images_or_paths)} images but {len(labels)} labels")
  labels = np.asarray(labels)
  tseed = _shard_seed(seed, shard_index)

  if indices is None:
    ds = _index_stream(len(labels), seed, shuffle, num_epochs, shard_index, shard_count, drop_remainder)
  else:
    indices = np.asarray(indices).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(labels)):
      raise ValueError(f"indices must lie in [0, {len(labels)})")
    ds = grain.MapDataset.source(indices)

  if isinstance(images_or_paths, np.ndarray):
    images = images_or_paths

    def gather(b: int, idx: np.ndarray) -> dict[str, np.ndarray]:
      batch = images[idx]  # one fancy-indexed read; also copies out of a memmap
      if transform is not None:
        batch = np.stack([transform(img, _element_rng(tseed, b * batch_size + j)) for j, img in enumerate(batch)])
      return {"image": batch, "label": labels[idx]}

    ds = ds.batch(batch_size, drop_remainder=drop_remainder).map_with_index(gather)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=min(num_threads, prefetch),
                                                     prefetch_buffer_size=prefetch)))

  paths = list(images_or_paths)

  def load(p: int, i: int) -> dict[str, np.ndarray]:
    img = decode_image(paths[i])
    if image_size is not None:
      img = resize_image(img, image_size, resize)
    if transform is not None:
      img = transform(img, _element_rng(tseed, p))
    return {"image": img, "label": labels[i]}

  ds = ds.map_with_index(load)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch * batch_size, num_threads))
  return iter(ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder))


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Horizontal mirror with probability p (the transfer report's augmentation)."""
  return image[:, ::-1] if rng.random() < p else image


def random_crop(image: np.ndarray, rng: np.random.Generator, crop: int) -> np.ndarray:
  """Uniformly placed crop x crop window (Caffe's training crop: offsets 0..H-crop inclusive)."""
  h, w = image.shape[:2]
  if crop > h or crop > w:
    raise ValueError(f"crop {crop} is larger than the image ({h}x{w})")
  top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
  return image[top:top + crop, left:left + crop]


def crop_and_mirror(crop: int = 224) -> Transform:
  """The paper's training augmentation on 256x256 inputs: random crop (224) then random mirror."""
  return lambda image, rng: random_flip(random_crop(image, rng, crop), rng)


def center_crop_transform(crop: int = 224) -> Transform:
  """The paper's test-time input: the central crop (no randomness)."""
  return lambda image, rng: center_crop(image, crop)


def compose(*transforms: Transform) -> Transform:
  """Applies transforms left to right, sharing one generator."""
  def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for t in transforms:
      image = t(image, rng)
    return image
  return apply

