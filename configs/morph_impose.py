"""The paper's pre-training size study on MORPH 2 (docs/protocol.md, Table 4, Fig. 8).

DEX, and DEX further trained on IMDB resampled to the MORPH 2 age distribution using 100, 1,000, 10,000 or all
IMDB training samples; then the MORPH 2 learning curve of configs/morph.py from each. table.md is Table 4,
learning_curve.png is Fig. 8.

As the authors ran it (the defaults): `target=test`, the imposed histogram is the TEST set's (2_1_test's 1095
labels), so the stages READ TEST LABELS; `stop=fixed`, the authors' fixed step counts of 15 images (as in
configs/lap_impose.py). `target=pool` imposes the training pool's histogram (no test label seen), `stop=converge`
trains to convergence on 2,000 held-out IMDB images. `lists=DIR` gives the authors' split lists (configs/morph.py).
Needs `dex=`, `imdb=` and `--config.data.root` (MORPH 2); stages are reused by config hash.

  python -m agejax.main --workdir runs/morph_impose --config.data.root=/data/MORPH2 \\
      --config configs/morph_impose.py:dex=priors/dex_imdb_wiki,imdb=/data/imdb_crop,lists=/data/lists
  python -m agejax.reports.compare --paper morph --workdir runs/morph_impose \\
      --authors AUTHORS/MORPH_2/fine-tuning/Part_1/Learning_curve_results \\
                AUTHORS/MORPH_2/fine-tuning/Part_2/Learning_curve_results
"""

import ml_collections

from agejax.configs import IMDB_ALL_READER, paper_options, parse_arg, sample_size_priors, source_data
from configs import morph

SOURCE_SIZES = (100, 1000, 10000, 0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dex="", imdb="", lists="", target="test", stop="fixed")
  target, fixed = paper_options(a.target, a.stop)
  c = morph.get_config(f"dex={a.dex},lists={a.lists},target={a.target},stop={a.stop}")
  c.title = "MORPH 2: its distribution imposed on DEX with 0 / 100 / 1,000 / 10,000 / all IMDB samples (Table 4)"
  if not a.dex:
    c.priors = [dict(name="dex", dir="", head="keep")]  # a run stops with a ConfigError naming priors[dex].dir
  source = source_data("imdb_wiki", a.imdb, test_fraction=0.1, reader_options=IMDB_ALL_READER)
  converge = {} if fixed else dict(epochs=10.0, val_size=2000)
  c.priors.extend(sample_size_priors(a.dex, source, "morph", SOURCE_SIZES, batch_size=c.batch_size,
                                     matched_target=target, fixed=fixed, **converge))
  return c
