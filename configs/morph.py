"""The paper's MORPH 2 study (PROTOCOL.md §3, Table 2): pool of 4380 train / 1095 test images.

Sizes 3..4380 (Table 2), trials halving from 32, the LAP solver's scaling (stepsize ~ n, max_iter ~ 5 n),
the same SGD, input handling and per-layer multipliers as configs/lap.py. Priors as in lap.py (`imdb=PATH`
adds Table 2's imposed-distribution columns, as in lap.py).

  python -m agejax.main --config configs/morph.py:dex=priors/dex_imdb_wiki --workdir runs/morph \\
      --config.data.root=/data/MORPH2
"""

import ml_collections

from agejax.configs import MORPH_SIZES, base_config, imposed_dex_priors, parse_arg, scaled_sizes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dex="", vggface="", imagenet="", imdb="")
  c = base_config()
  c.title = "MORPH 2: adaptation of deep priors (paper Table 2)"
  c.data.update(name="morph", root="", resize=256, crop=224, test_size=1095, pool_limit=4380)
  c.sizes = scaled_sizes(list(MORPH_SIZES))
  c.priors = [dict(name=name, dir=path, head="keep" if name == "dex" else "new")
              for name, path in (("dex", a.dex), ("vggface", a.vggface), ("imagenet", a.imagenet)) if path]
  if a.imdb:  # Table 2's imposed distributions, placed after DEX as in the paper
    c.priors[1:1] = imposed_dex_priors(a.dex, a.imdb, "morph", solver=c.optim.to_dict())
  return c
