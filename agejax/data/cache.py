"""Decode a list of images once into a memory-mappable .npy cache, in parallel, with bad files handled by policy.

A cache entry is `<key>.npy` (uint8, (N_kept, size, size, 3)) plus `<key>.json` (key, count, kept indices,
rejected files). The key hashes the absolute paths in order, each file's size and mtime, the output size,
the resize mode, the crop adaptation (pad/crop fractions, when not the defaults) and FORMAT_VERSION, so any
change to the inputs gives a new entry. Both files are written to a temporary name and renamed; the JSON is
renamed last and an entry is trusted only when it is present and agrees with the array, so an interrupted run
never leaves a cache that is later used.
"""

import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import tqdm

from agejax.cachedir import cache_root
from agejax.data.images import PAD_MODES, RESIZE_MODES, PadMode, ResizeMode, adapt_crop, decode_image, resize_image
from agejax.data.records import Rejections
from agejax.errors import DatasetError

FORMAT_VERSION = 1
MISSING = "missing file"
CORRUPT = "corrupt image"
CHECK_SIZE = 8  # validate_images keeps this small a copy of each image
Backend = Literal["thread", "process"]


def default_cache_dir() -> str:
  """$AGEJAX_CACHE, else ~/.cache/agejax (`agejax.cachedir.cache_root`)."""
  return cache_root()


def _file_stamps(paths: Sequence[str]) -> list[tuple[str, int, int] | None]:
  """(absolute path, size, mtime_ns) per file; None where the file is missing."""
  out = []
  for p in paths:
    try:
      st = os.stat(p)
      out.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    except FileNotFoundError:
      out.append(None)
  return out


def cache_key(paths: Sequence[str], size: int, resize: str, stamps: Sequence[tuple[str, int, int] | None]) -> str:
  """Hex digest identifying a decode of `paths` at `size` with `resize` (see module docstring)."""
  h = hashlib.sha256(f"agejax-images v{FORMAT_VERSION} size={size} resize={resize} n={len(paths)}\n".encode())
  for p, s in zip(paths, stamps, strict=True):
    h.update((f"{os.path.abspath(p)}\0missing\n" if s is None else f"{s[0]}\0{s[1]}\0{s[2]}\n").encode())
  return h.hexdigest()[:32]


def _decode_resized(job: tuple) -> tuple[np.ndarray | None, str | None]:
  """Worker: (image, None) or (None, error message). Top level so process pools can pickle it."""
  path, size, resize, *adapt = job  # adapt: (pad_fraction, pad_mode, crop_fraction) when not the defaults
  try:
    if os.path.getsize(path) == 0:  # PIL would only say it cannot identify the file
      return None, f"{path}: empty file (0 bytes)"
    img = decode_image(path)
    return resize_image(adapt_crop(img, *adapt) if adapt else img, size, resize), None
  except OSError as e:  # vanished or unreadable since the stamps were taken
    return None, f"{path}: cannot read file ({e.strerror or e})"
  except DatasetError as e:
    return None, str(e)


def _decoded(jobs: list[tuple[str, int, str]], workers: int, backend: Backend) -> Iterator[tuple[Any, Any]]:
  """Yields worker results in input order."""
  if workers <= 1 or len(jobs) <= 1:
    yield from map(_decode_resized, jobs)
  elif backend == "thread":
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
      yield from ex.map(_decode_resized, jobs, chunksize=1)
  elif backend == "process":
    # spawn, not fork: the parent may already run JAX's threads.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      yield from pool.imap(_decode_resized, jobs, chunksize=64)
  else:
    raise ValueError(f"backend must be 'thread' or 'process', got {backend!r}")


def _atomic_path(final: str) -> str:
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(final) + ".", suffix=".tmp", dir=os.path.dirname(final))
  os.close(fd)
  os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by others
  return tmp


def _read_entry(npy: str, meta_path: str, key: str, size: int) -> tuple[np.ndarray, dict] | None:
  """The cached (array, metadata) if the entry is complete and consistent, else None."""
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    arr = np.load(npy, mmap_mode="r")
  except (OSError, ValueError):
    return None
  if (meta.get("key") != key or meta.get("format_version") != FORMAT_VERSION or arr.dtype != np.uint8
      or arr.shape != (meta.get("count"), size, size, 3) or len(meta.get("kept", ())) != arr.shape[0]):
    return None
  return arr, meta


def _usable_cpus() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _reject_corrupt(rejections: Rejections, path: str, detail: str) -> None:
  """Rejects an undecodable file; under 'strict' the error carries PIL's reason, not only 'corrupt image'."""
  try:
    rejections.reject(path, CORRUPT)
  except DatasetError as e:
    raise DatasetError(f"{detail}; {e}") from None


def _replay(meta: dict, rejections: Rejections) -> None:
  for path, reason, detail in meta["rejected"]:
    if reason == CORRUPT:
      _reject_corrupt(rejections, path, detail)
    else:
      rejections.reject(path, reason)


def validate_images(paths: Sequence[str], cache_dir: str | None, rejections: Rejections | None = None,
                    progress: bool = True) -> np.ndarray:
  """Indices into `paths` of the files that decode; the others go through `rejections` as by load_images.

  Every file is decoded in full, but only a CHECK_SIZE copy is kept (and cached), so a large dataset is validated
  without holding it at full size."""
  return load_images(paths, CHECK_SIZE, cache_dir, rejections=rejections, progress=progress)[1]


def load_images(paths: Sequence[str], size: int, cache_dir: str | None, resize: ResizeMode = "squash",
                rejections: Rejections | None = None, workers: int | None = None, progress: bool = True,
                backend: Backend = "thread", pad_fraction: float = 0.0, pad_mode: PadMode = "edge",
                crop_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Decodes and resizes `paths` to (N_kept, size, size, 3) uint8, reading a cached copy when there is one.

  Returns (images, kept) where kept[i] is the index into `paths` of images[i]. Missing and undecodable files go
  through `rejections` (reasons 'missing file' / 'corrupt image'); None means a strict policy, which raises
  DatasetError naming the first bad file. A cache hit replays the recorded rejections, so both paths behave the
  same. `cache_dir` (usually default_cache_dir()) gives a read-only memory map of the cache file; None decodes
  into memory without caching. `workers` defaults to the usable CPU count; `backend` picks threads (PIL releases
  the GIL; on par with or faster than spawned processes on UTKFace here) or processes. `crop_fraction`,
  `pad_fraction` and `pad_mode` re-frame every decoded image before the resize (agejax.data.images.adapt_crop:
  keep the central fraction, then pad each side by a fraction of the size, replicating ('edge') or mirroring
  ('reflect') the border), e.g. to give tight face chips the context a prior was trained with.
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize!r}")
  if size <= 0:
    raise ValueError(f"size must be positive, got {size}")
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
  if not (pad_fraction >= 0 and 0 < crop_fraction <= 1):
    raise ValueError(f"need pad_fraction >= 0 and 0 < crop_fraction <= 1, got {pad_fraction}, {crop_fraction}")
  adapt = () if (pad_fraction, crop_fraction) == (0, 1) else (float(pad_fraction), pad_mode, float(crop_fraction))
  # The cache key and metadata describe the adaptation only when there is one, so default decodes keep their keys.
  what = resize if not adapt else f"{resize} crop_fraction={adapt[2]} pad_fraction={adapt[0]} pad_mode={adapt[1]}"
  rejections = rejections if rejections is not None else Rejections("strict")
  paths = [os.fspath(p) for p in paths]
  stamps = _file_stamps(paths)

  npy = meta_path = key = None
  if cache_dir is not None:
    os.makedirs(cache_dir, exist_ok=True)
    key = cache_key(paths, size, what, stamps)
    npy, meta_path = os.path.join(cache_dir, key + ".npy"), os.path.join(cache_dir, key + ".json")
    hit = _read_entry(npy, meta_path, key, size)
    if hit is not None:
      arr, meta = hit
      _replay(meta, rejections)
      return arr, np.asarray(meta["kept"], dtype=np.int64)

  # Missing files are reported (and, under 'strict', raised) before any decoding starts.
  rejected: list[tuple[str, str, str]] = []  # (path, reason, detail)
  todo = []
  for i, (p, s) in enumerate(zip(paths, stamps, strict=True)):
    if s is None:
      rejections.reject(p, MISSING)
      rejected.append((p, MISSING, ""))
    else:
      todo.append(i)

  shape = (len(todo), size, size, 3)
  tmp_npy = _atomic_path(npy) if npy else None
  try:
    out = (np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=shape) if tmp_npy
           else np.empty(shape, np.uint8))
    kept = []
    jobs = [(paths[i], size, resize, *adapt) for i in todo]
    results = _decoded(jobs, workers or _usable_cpus(), backend)
    bar = tqdm.tqdm(total=len(jobs), desc=f"decoding images at {size}px", unit="img", disable=not progress)
    with contextlib.closing(results), bar:
      for i, (img, err) in zip(todo, results, strict=True):
        bar.update()
        if img is None:
          _reject_corrupt(rejections, paths[i], err)
          rejected.append((paths[i], CORRUPT, err))
          continue
        out[len(kept)] = img
        kept.append(i)
    kept_arr = np.asarray(kept, dtype=np.int64)
    if tmp_npy is None:
      return (out if len(kept) == len(todo) else out[:len(kept)].copy()), kept_arr

    if len(kept) < len(todo):  # compact into a file of the final shape
      small_tmp = _atomic_path(npy)
      small = np.lib.format.open_memmap(small_tmp, mode="w+", dtype=np.uint8, shape=(len(kept), size, size, 3))
      small[:] = out[:len(kept)]
      small.flush()
      del small, out
      os.replace(small_tmp, tmp_npy)
    else:
      out.flush()
      del out
    os.replace(tmp_npy, npy)
    tmp_npy = None
    meta = {"key": key, "format_version": FORMAT_VERSION, "size": size, "resize": what, "count": len(kept),
            "num_paths": len(paths), "kept": kept, "rejected": rejected}
    tmp_meta = _atomic_path(meta_path)
    with open(tmp_meta, "w") as f:
      json.dump(meta, f)
    os.replace(tmp_meta, meta_path)
  finally:
    if tmp_npy is not None and os.path.exists(tmp_npy):
      os.remove(tmp_npy)
  return np.load(npy, mmap_mode="r"), kept_arr
