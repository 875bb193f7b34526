"""Backbones as an ordered sequence of named stages, so a frozen prefix can be computed once and cached.

A staged backbone has `stage_names()` and `__call__(x, train=False, start=None, stop=None)`, which runs the
stages from `start` (inclusive; default the first) up to `stop` (exclusive; default through the last):
`bb(bb(x, stop=s), start=s) == bb(x)` for every stage name `s`. The last stage's output is the feature
vector the head takes.
"""

from collections.abc import Sequence


def stage_range(names: Sequence[str], start: str | None, stop: str | None) -> tuple[str, ...]:
  """The stage names from `start` (inclusive) to `stop` (exclusive); an unknown name is a ValueError."""
  names = tuple(names)
  for label, value in (("start", start), ("stop", stop)):
    if value is not None and value not in names:
      raise ValueError(f"unknown {label} stage {value!r}; stages: {', '.join(names)}")
  i = 0 if start is None else names.index(start)
  j = len(names) if stop is None else names.index(stop)
  if j < i:
    raise ValueError(f"stop stage {stop!r} comes before start stage {start!r}")
  return names[i:j]
