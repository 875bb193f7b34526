"""The paper's pre-training size study on MORPH 2 (PROTOCOL.md §4, Table 4, Fig. 8).

DEX, and DEX further trained on IMDB resampled to the MORPH 2 training pool's age distribution using 100,
1,000, 10,000 or all IMDB training samples (to convergence on 2,000 held-out IMDB images); then the MORPH 2
learning curve of configs/morph.py from each. table.md is Table 4, learning_curve.png is Fig. 8.
Needs `dex=`, `imdb=` and `--config.data.root` (MORPH 2); stages are reused by config hash.

  python -m agejax.main --config configs/morph_impose.py:dex=priors/dex_imdb_wiki,imdb=/data/imdb_crop \\
      --workdir runs/morph_impose --config.data.root=/data/MORPH2
"""

import ml_collections

from agejax.configs import IMDB_ALL_READER, parse_arg, sample_size_priors, source_data
from configs import morph

SOURCE_SIZES = (100, 1000, 10000, 0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dex="", imdb="")
  c = morph.get_config(f"dex={a.dex}")
  c.title = "MORPH 2: its distribution imposed on DEX with 0 / 100 / 1,000 / 10,000 / all IMDB samples (Table 4)"
  if not a.dex:
    c.priors = [dict(name="dex", dir="", head="keep")]  # a run stops with a ConfigError naming priors[dex].dir
  source = source_data("imdb_wiki", a.imdb, test_fraction=0.1, reader_options=IMDB_ALL_READER)
  c.priors.extend(sample_size_priors(a.dex, source, "morph", SOURCE_SIZES, batch_size=c.batch_size, epochs=10.0,
                                     val_size=2000))
  return c
