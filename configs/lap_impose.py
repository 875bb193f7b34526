"""The paper's pre-training size study on LAP (PROTOCOL.md §4, Table 3, Fig. 7).

DEX, and DEX further trained on IMDB resampled to the LAP training pool's age distribution using 100, 1,000,
10,000 or all IMDB training samples (to convergence: early stopping on 2,000 held-out IMDB images, resampled
the same way); then the LAP learning curve of configs/lap.py from each. table.md is Table 3 (one column per
prior), learning_curve.png is Fig. 7, diagnostics/source_distributions.png the imposed histograms (Fig. 3).
Needs the DEX prior (`dex=`, ported with `agejax.port --format caffe`), IMDB-WIKI (`imdb=`, the folder with
imdb.mat) and LAP (`--config.data.root`). Stages are stored under WORKDIR/priors and reused by config hash.

  python -m agejax.main --config configs/lap_impose.py:dex=priors/dex_imdb_wiki,imdb=/data/imdb_crop \\
      --workdir runs/lap_impose --config.data.root=/data/chalearn_lap2015
"""

import ml_collections

from agejax.configs import IMDB_ALL_READER, parse_arg, sample_size_priors, source_data
from configs import lap

SOURCE_SIZES = (100, 1000, 10000, 0)  # 0 = all (368,553 in the paper)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dex="", imdb="", runlocal=False)
  c = lap.get_config(f"dex={a.dex}" + (",runlocal" if a.runlocal else ""))
  c.title = "LAP: the LAP distribution imposed on DEX with 0 / 100 / 1,000 / 10,000 / all IMDB samples (Table 3)"
  if not a.dex:
    c.priors = [dict(name="dex", dir="", head="keep")]  # a run stops with a ConfigError naming priors[dex].dir
  source = source_data("imdb_wiki", a.imdb, test_fraction=0.1, reader_options=IMDB_ALL_READER)
  c.priors.extend(sample_size_priors(a.dex, source, "lap", SOURCE_SIZES, batch_size=c.batch_size, epochs=10.0,
                                     val_size=2000))
  return c
