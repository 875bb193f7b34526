"""The paper's pre-training size study on LAP (docs/protocol.md, Table 3, Fig. 7).

DEX, and DEX further trained on IMDB resampled to the LAP age distribution using 100, 1,000, 10,000 or all
IMDB training samples; then the LAP learning curve of configs/lap.py from each. table.md is Table 3 (one column
per prior), learning_curve.png is Fig. 7, diagnostics/source_distributions.png the imposed histograms (Fig. 3).

As the authors ran it (the defaults): `target=test`, the imposed histogram is the TEST set's (the 1136 LAP
validation labels), so the stages READ TEST LABELS; `stop=fixed`, each stage trains a fixed number of steps of
15 images at lr 1e-4 (100 samples: 68 steps, lr x0.1 every 27; 1,000: 678 / 271; 10,000: 6783 / 2713; all:
250k / 100k), no early stopping. `target=pool` imposes the training pool's histogram (no test label seen),
`stop=converge` trains to convergence (early stopping on 2,000 held-out IMDB images, resampled the same way).
`lists=DIR` gives the authors' split lists, as in configs/lap.py.
Needs the DEX prior (`dex=`, ported with `agejax.port --format caffe`), IMDB-WIKI (`imdb=`, the folder with
imdb.mat) and LAP (`--config.data.root`). Stages are stored under WORKDIR/priors and reused by config hash.

  python -m agejax.main --workdir runs/lap_impose --config.data.root=/data/chalearn_lap2015 \\
      --config configs/lap_impose.py:dex=priors/dex_imdb_wiki,imdb=/data/imdb_crop,lists=/data/lists
  python -m agejax.reports.compare --paper lap --workdir runs/lap_impose \\
      --authors AUTHORS/LAP/fine-tuning/Part_1/Learning_curve_results \\
                AUTHORS/LAP/fine-tuning/Part_2/Learning_curve_results
"""

import ml_collections

from agejax.configs import IMDB_ALL_READER, paper_options, parse_arg, sample_size_priors, source_data
from configs import lap

SOURCE_SIZES = (100, 1000, 10000, 0)  # 0 = all (368,553 in the paper)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dex="", imdb="", lists="", target="test", stop="fixed", runlocal=False)
  target, fixed = paper_options(a.target, a.stop)
  c = lap.get_config(f"dex={a.dex},lists={a.lists},target={target},stop={a.stop}" + (",runlocal" if a.runlocal else ""))
  c.title = "LAP: the LAP distribution imposed on DEX with 0 / 100 / 1,000 / 10,000 / all IMDB samples (Table 3)"
  if not a.dex:
    c.priors = [dict(name="dex", dir="", head="keep")]  # a run stops with a ConfigError naming priors[dex].dir
  source = source_data("imdb_wiki", a.imdb, test_fraction=0.1, reader_options=IMDB_ALL_READER)
  converge = {} if fixed else dict(epochs=10.0, val_size=2000)
  c.priors.extend(sample_size_priors(a.dex, source, "lap", SOURCE_SIZES, batch_size=c.batch_size,
                                     matched_target=target, fixed=fixed, **converge))
  return c
