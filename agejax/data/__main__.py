"""Dataset summary: `python -m agejax.data summarize --format utkface --root /path/to/UTKFace [--json] [--near]`.

Every image is decoded (as a study would; undecodable and empty files are rejected by name as corrupt images)
before anything is counted or grouped, so a rejected file is never a record nor a duplicate.
"""

import argparse
import json
import sys
from typing import get_args

import numpy as np

from agejax.data.cache import CORRUPT, validate_images
from agejax.data.distribution import age_histogram
from agejax.data.duplicates import exact_duplicate_groups, near_duplicate_groups
from agejax.data.readers import formats, load_dataset
from agejax.data.records import Policy
from agejax.errors import DatasetError

BIN = 5


def summarize(fmt: str, root: str, policy: str = "skip", near: bool = False, progress: bool = True,
              max_examples: int = 3, cache_dir: str | None = None) -> dict:
  """Counts, 5-year age bins, rejections by reason and duplicate groups of one dataset, as a JSON-ready dict.

  `cache_dir` keeps the decode verdicts (agejax.data.cache) for a faster rerun; None decodes afresh."""
  ds = load_dataset(fmt, root, policy=policy)
  kept = validate_images([r.path for r in ds.records], cache_dir, rejections=ds.rejections, progress=progress)
  ds.records = [ds.records[k] for k in kept]
  near_groups = None
  if near:  # before counting: a file that cannot be hashed is rejected too
    near_groups = near_duplicate_groups([r.path for r in ds.records], progress=progress, rejections=ds.rejections)
    unhashable = set(ds.rejections.examples.get(CORRUPT, []))
    ds.records = [r for r in ds.records if r.path not in unhashable]
  ages = np.array([r.age for r in ds.records], dtype=np.float64)
  top = int(max(100, np.ceil(ages.max()) if len(ages) else 0))
  hist = age_histogram(ages, max_age=top) if len(ages) else np.zeros(top + 1, np.int64)
  bins = {f"{lo}-{lo + BIN - 1}": int(hist[lo:lo + BIN].sum()) for lo in range(0, top + 1, BIN)}
  count = lambda key: {str(k): sum(1 for r in ds.records if getattr(r, key) == k)
                       for k in sorted({getattr(r, key) for r in ds.records}, key=str)}
  paths = [r.path for r in ds.records]
  exact = exact_duplicate_groups(paths, progress=progress)
  out = {
    "format": fmt, "root": ds.root, "records": len(ds),
    "age": {"mean": float(ages.mean()) if len(ages) else None, "min": float(ages.min()) if len(ages) else None,
            "max": float(ages.max()) if len(ages) else None, "bins": bins},
    "gender": count("gender"), "split": count("split"),
    "subjects": len({r.subject for r in ds.records if r.subject is not None}),
    "rejections": ds.rejections.to_dict(),
    "duplicates": {"exact": _dup_summary(exact, max_examples)},
  }
  if near_groups is not None:
    out["duplicates"]["near"] = _dup_summary(near_groups, max_examples)
  return out


def _dup_summary(groups: list[list[str]], max_examples: int) -> dict:
  return {"groups": len(groups), "extra_copies": sum(len(g) - 1 for g in groups), "examples": groups[:max_examples]}


def format_text(s: dict, width: int = 50) -> str:
  """The summary as text, with the age bins as bars."""
  lines = [f"{s['format']} at {s['root']}: {s['records']} records, {s['subjects']} subjects",
           f"gender: {s['gender']}", f"split: {s['split']}"]
  a = s["age"]
  if a["mean"] is not None:
    lines.append(f"age: mean {a['mean']:.1f}, min {a['min']:g}, max {a['max']:g}")
  peak = max(a["bins"].values(), default=0) or 1
  for label, n in a["bins"].items():
    lines.append(f"  {label:>7} {n:7d} {'#' * round(width * n / peak)}")
  rej = s["rejections"]
  lines.append(f"rejected or flagged ({rej['policy']}): {rej['total']}")
  for reason, info in rej["by_reason"].items():
    lines.append(f"  {info['count']:6d}  {reason}")
    lines += [f"          e.g. {e}" for e in info["files"][:3]]
    if info["count"] > 3:
      lines.append(f"          ... and {info['count'] - 3} more (--json lists every one)")
  for kind, d in s["duplicates"].items():
    lines.append(f"{kind} duplicates: {d['groups']} groups, {d['extra_copies']} extra copies")
    lines += [f"  {' == '.join(g)}" for g in d["examples"]]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m agejax.data", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("summarize", help="counts, age histogram, rejections and duplicates of a dataset")
  p.add_argument("--format", required=True, choices=formats())
  p.add_argument("--root", required=True)
  p.add_argument("--policy", default="skip", choices=get_args(Policy))
  p.add_argument("--json", action="store_true", help="print JSON instead of text")
  p.add_argument("--near", action="store_true", help="also find near duplicates (perceptual hash; slower)")
  p.add_argument("--cache-dir", default=None, help="keep the decoded check images here for a faster rerun")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                 help="progress bars on stderr (default: when stderr is a terminal)")
  args = parser.parse_args(argv)
  progress = sys.stderr.isatty() if args.progress is None else args.progress
  try:
    s = summarize(args.format, args.root, args.policy, near=args.near, progress=progress, cache_dir=args.cache_dir)
  except (DatasetError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(s, indent=2) if args.json else format_text(s))
  return 0


if __name__ == "__main__":
  sys.exit(main())
