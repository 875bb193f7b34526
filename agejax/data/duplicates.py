"""Duplicate images: exact copies by content hash, near copies by a DCT perceptual hash, and leak-free splits.

A duplicate pair across train and test leaks a label, so splits are drawn over duplicate groups, not images.
"""

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from scipy.fft import dctn

from agejax.data.cache import CORRUPT
from agejax.data.records import Rejections
from agejax.errors import DatasetError

_WORKERS = min(8, (os.cpu_count() or 1) * 2)


def _progress(it: Iterable, total: int, desc: str, show: bool) -> Iterable:
  if not show:
    return it
  from tqdm import tqdm

  return tqdm(it, total=total, desc=desc, unit="img")


def file_digest(path: str) -> str | None:
  """BLAKE2b digest of the file's bytes; None for an empty file (no image, so no one's copy)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DatasetError(f"{path}: cannot read file ({e.strerror or e})") from e
  return hashlib.blake2b(data, digest_size=20).hexdigest() if data else None


def _groups_by_key(paths: Sequence[str], keys: Iterable) -> list[list[str]]:
  """Groups of 2+ paths sharing a key; a None key (no content) groups with nothing."""
  by_key = defaultdict(list)
  for p, k in zip(paths, keys, strict=True):
    if k is not None:
      by_key[k].append(p)
  return sorted((sorted(g) for g in by_key.values() if len(g) > 1), key=lambda g: g[0])


def exact_duplicate_groups(paths: Sequence[str], progress: bool = False) -> list[list[str]]:
  """Groups (2+ paths each, sorted) of byte-identical files; hashing runs in threads. Empty files are never
  grouped (they are corrupt images, not copies of each other)."""
  with ThreadPoolExecutor(_WORKERS) as pool:
    digests = list(_progress(pool.map(file_digest, paths), len(paths), "hashing", progress))
  return _groups_by_key(paths, digests)


def phash(path: str, size: int = 32, bits: int = 8) -> int:
  """64-bit DCT perceptual hash: low-frequency DCT terms of a 32x32 grayscale, thresholded at their median."""
  from PIL import Image

  try:
    with Image.open(path) as im:
      im.draft("L", (size * 2, size * 2))  # JPEG: decode at reduced scale, much faster
      g = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
  low = dctn(g, norm="ortho")[:bits, :bits].ravel()[1:]  # drop the DC term (overall brightness)
  on = low > np.median(low)
  return int(np.packbits(np.concatenate([[False], on])).view(">u8")[0])


def hamming(a: int, b: int) -> int:
  return (a ^ b).bit_count()


def _phash_or_error(path: str) -> int | DatasetError:
  try:
    return phash(path)
  except DatasetError as e:
    return e


def near_duplicate_groups(paths: Sequence[str], max_distance: int = 4, progress: bool = False,
                          rejections: Rejections | None = None) -> list[list[str]]:
  """Groups of images whose perceptual hashes differ in at most `max_distance` bits (connected components).

  An undecodable file raises DatasetError naming it, or, with `rejections`, goes there as 'corrupt image'
  (raising under 'strict') and joins no group. Candidate pairs come from splitting the 64 bits into
  max_distance + 1 bands: two hashes within the distance agree exactly on at least one band (pigeonhole), so
  only same-band buckets are compared.
  """
  with ThreadPoolExecutor(_WORKERS) as pool:
    results = list(_progress(pool.map(_phash_or_error, paths), len(paths), "perceptual hashing", progress))
  for p, r in zip(paths, results, strict=True):
    if isinstance(r, DatasetError):
      if rejections is None:
        raise r
      rejections.reject(p, CORRUPT)
  good = [i for i, r in enumerate(results) if not isinstance(r, DatasetError)]
  paths, hashes = [paths[i] for i in good], [results[i] for i in good]
  n_bands = max_distance + 1
  edges = np.linspace(0, 64, n_bands + 1).astype(int)
  parent = list(range(len(paths)))

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for lo, hi in zip(edges[:-1], edges[1:], strict=True):
    buckets = defaultdict(list)
    for i, h in enumerate(hashes):
      buckets[(h >> lo) & ((1 << (hi - lo)) - 1)].append(i)
    for members in buckets.values():
      for a in range(len(members)):
        for b in range(a + 1, len(members)):
          i, j = members[a], members[b]
          if find(i) != find(j) and hamming(hashes[i], hashes[j]) <= max_distance:
            parent[find(i)] = find(j)
  return _groups_by_key(paths, [find(i) for i in range(len(paths))])


def group_ids(paths: Sequence[str], groups: Iterable[Sequence[str]]) -> np.ndarray:
  """Component id per path: members of one group share an id, every other path has its own."""
  ids = np.arange(len(paths))
  where = defaultdict(list)
  for i, p in enumerate(paths):
    where[p].append(i)
  next_id = len(paths)
  for g in groups:
    idx = [i for p in g for i in where.get(p, [])]
    ids[idx] = next_id
    next_id += 1
  for idx in where.values():  # the same path listed twice is its own duplicate
    if len(idx) > 1:
      ids[idx] = ids[idx[0]]
  return ids


def _paths(records: Sequence) -> list[str]:
  return [r.path if hasattr(r, "path") else str(r) for r in records]


def distinct_images(records: Sequence, groups: Iterable[Sequence[str]]) -> int:
  """How many images `records` hold once each duplicate group counts as one."""
  return len(np.unique(group_ids(_paths(records), groups)))


def split_without_leaks(records: Sequence, test_size: int, seed: int, groups: Iterable[Sequence[str]],
                        report: dict | None = None) -> tuple[list[int], list[int]]:
  """(pool indices, test indices) into `records` with no duplicate group on both sides.

  Each group keeps one member (its lowest index), so neither side holds two copies of an image; the number
  of members removed goes to `report['removed']` when a dict is passed. Deterministic for a given seed.
  """
  paths = _paths(records)
  ids = group_ids(paths, groups)
  _, keep = np.unique(ids, return_index=True)
  if test_size > len(keep):
    raise DatasetError(f"a test set of {test_size} images exceeds the {len(keep)} distinct images")
  order = np.random.default_rng(seed).permutation(keep)
  test, pool = sorted(order[:test_size].tolist()), sorted(order[test_size:].tolist())
  if report is not None:
    report.update(removed=len(paths) - len(keep), groups=int(np.sum(np.bincount(ids) > 1)), pool=len(pool),
                  test=len(test))
  return pool, test


def check_split(train_paths: Sequence[str], test_paths: Sequence[str], groups: Iterable[Sequence[str]],
                action: Literal["refuse", "remove"] = "refuse") -> list[str]:
  """Train paths with no duplicate in the test set; 'refuse' raises `DatasetError` if any would be dropped."""
  if action not in ("refuse", "remove"):
    raise ValueError(f"action must be 'refuse' or 'remove', got {action!r}")
  test = set(test_paths)
  tainted = set(test)
  for g in groups:
    if test.intersection(g):
      tainted.update(g)
  leaks = [p for p in train_paths if p in tainted]
  if leaks and action == "refuse":
    raise DatasetError(f"{len(leaks)} training images duplicate a test image, e.g. {leaks[0]} "
                       "(action 'refuse'; use action 'remove' to drop them)")
  return [p for p in train_paths if p not in tainted]
