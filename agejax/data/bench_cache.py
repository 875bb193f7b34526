"""Times load_images on a folder of images: a cold run (decode + write the cache) then a warm one (cache hit).

  python -m agejax.data.bench_cache --root /path/to/UTKFace --size 64 --cache-dir /tmp/agejax_cache_bench

Prints one JSON object. The cold run first deletes this input's cache entry, so it always decodes.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from agejax.data import cache
from agejax.data.images import RESIZE_MODES
from agejax.data.records import Rejections
from agejax.errors import AgejaxError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(root: str) -> list[str]:
  """Image files directly under root, sorted by name."""
  return sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))


def run(root: str, size: int, cache_dir: str, resize: str = "squash", backend: str = "thread",
        workers: int | None = None, limit: int | None = None) -> dict:
  """Cold and warm timings (wall seconds) of load_images over the images in root."""
  paths = list_images(root)[:limit]
  key = cache.cache_key(paths, size, resize, cache._file_stamps(paths))
  for ext in (".npy", ".json"):
    if os.path.exists(os.path.join(cache_dir, key + ext)):
      os.remove(os.path.join(cache_dir, key + ext))

  rej = Rejections("skip")
  t0 = time.perf_counter()
  imgs, kept = cache.load_images(paths, size, cache_dir, resize, rej, workers, progress=False, backend=backend)
  cold = time.perf_counter() - t0
  del imgs

  t0 = time.perf_counter()
  imgs, kept2 = cache.load_images(paths, size, cache_dir, resize, Rejections("skip"), workers, progress=False)
  warm = time.perf_counter() - t0
  in_memory = np.array(imgs)  # forces every page of the cache file to be read
  warm_read = time.perf_counter() - t0
  checksum = int(in_memory.sum(dtype=np.uint64))
  assert np.array_equal(kept, kept2)
  return {"root": os.path.abspath(root), "files": len(paths), "size": size, "resize": resize, "backend": backend,
          "workers": workers or cache._usable_cpus(), "cold_decode_and_write_s": round(cold, 2),
          "warm_cache_open_s": round(warm, 4), "warm_open_and_read_all_s": round(warm_read, 2),
          "images_per_s_cold": round(len(paths) / cold, 1), "shape": list(imgs.shape),
          "cache_bytes": os.path.getsize(os.path.join(cache_dir, key + ".npy")), "kept": len(kept),
          "rejected": rej.counts_by_reason(), "checksum": checksum, "cache_key": key}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--root", required=True)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--cache-dir", default=None, help="default: $AGEJAX_CACHE or ~/.cache/agejax")
  ap.add_argument("--resize", default="squash", choices=RESIZE_MODES)
  ap.add_argument("--backend", default="thread", choices=("thread", "process"))
  ap.add_argument("--workers", type=int, default=None)
  ap.add_argument("--limit", type=int, default=None, help="only the first N files (by name)")
  a = ap.parse_args(argv)
  if not os.path.isdir(a.root):
    print(f"error: --root {a.root}: not a folder", file=sys.stderr)
    return 2
  try:
    out = run(a.root, a.size, a.cache_dir or cache.default_cache_dir(), a.resize, a.backend, a.workers, a.limit)
  except (AgejaxError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
