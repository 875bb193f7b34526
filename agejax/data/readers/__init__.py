"""Dataset readers by format name: `load_dataset('utkface', root)` returns a `Dataset`.

Every reader takes `policy` ('strict' raises `DatasetError` naming the file or file:line at the first bad
input; 'skip' drops it and counts the reason) plus format-specific options. Records come back sorted by
path with absolute paths. Reasons starting with 'warning: ' describe inputs that were kept.
"""

# Modules register their formats on import.
from agejax.data.readers import agedb, appa_real, fgnet, generic, imdb_wiki, lap, morph, utkface  # noqa: F401
from agejax.data.readers.common import REGISTRY, WARNING
from agejax.data.records import Dataset

__all__ = ["REGISTRY", "WARNING", "formats", "load_dataset"]


def formats() -> list[str]:
  """Registered format names."""
  return sorted(REGISTRY)


def load_dataset(fmt: str, root: str, policy: str = "skip", **options) -> Dataset:
  """Reads dataset `root` in format `fmt` under the bad-input `policy`; `options` go to the reader."""
  key = fmt.lower().replace("-", "_")
  if key not in REGISTRY:
    raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(formats())}")
  return REGISTRY[key](root, policy=policy, **options)
