"""The paper's MORPH 2 study (docs/protocol.md, Table 2): a pool of 4380 images, a test set of 1095.

As the authors ran it: the portions of LAP's table plus 0.000625 and 0.0017 of the pool, n = int(4380 p / 0.8)
= 3 .. 4380 images (Table 2), 32 trials up to 27 images, then 16, 8, 4, 2 and 1; the Caffe solver
(stepsize, max_iter) keyed to the portion as on LAP (agejax.configs.MORPH_SOLVER: 2/10 for 3 images ..
2000/10000 for 4380); every training image stored with 10 rotated versions (11, drawn together); the SGD,
input handling and per-layer multipliers of configs/lap.py. Priors as in lap.py.

Split: `lists=DIR` (config.data.split_lists) reads the authors' fixed lists 2_1_train.txt (pool, 4380) and
2_1_test.txt (test, 1095; Rothe et al.'s fold, NOT subject-disjoint) from DIR, as in the paper; without it,
a seeded subject-disjoint split (1095 test images, a pool of at most 4380).

`imdb=PATH` adds Table 2's imposed-distribution columns, as in lap.py; with `target=test` (the default, as the
authors ran it) the matched stage imposes the TEST set's age histogram (2_1_test): it READS TEST LABELS;
`target=pool` imposes the pool's instead. `stop=fixed` (default): the authors' fixed 250k steps of 15 images;
`stop=converge`: early stopping on held-out IMDB.

  python -m agejax.main --workdir runs/morph --config.data.root=/data/MORPH2 \\
      --config configs/morph.py:dex=priors/dex,vggface=priors/vggface,imagenet=priors/imagenet_vgg16,lists=/data/lists
  python -m agejax.main --workdir runs/morph_table2 --config.data.root=/data/MORPH2 \\
      --config configs/morph.py:dex=priors/dex,imdb=/data/imdb_crop,lists=/data/lists
  python -m agejax.reports.compare --paper morph --workdir runs/morph_table2 \\
      --authors AUTHORS/MORPH_2/fine-tuning/Part_1/Learning_curve_results \\
                AUTHORS/MORPH_2/fine-tuning/Part_2/Learning_curve_results

(/data/lists holds the authors' MORPH_2/fine-tuning/Part_1/2_1_train.txt and 2_1_test.txt.)
"""

import ml_collections

from agejax.configs import (
  MORPH_SOLVER,
  PAPER_ROTATIONS,
  base_config,
  imposed_dex_priors,
  paper_options,
  parse_arg,
  solver_sizes,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dex="", vggface="", imagenet="", imdb="", lists="", target="test", stop="fixed")
  target, fixed = paper_options(a.target, a.stop)
  c = base_config()
  c.title = "MORPH 2: adaptation of deep priors (paper Table 2)"
  c.data.update(name="morph", root="", resize=256, crop=224, test_size=1095, pool_limit=4380,
                rotation_angles=PAPER_ROTATIONS)
  c.data.split_lists = a.lists  # '' = the seeded subject-disjoint split
  c.sizes = solver_sizes(MORPH_SOLVER)
  c.priors = [dict(name=name, dir=path, head="keep" if name == "dex" else "new")
              for name, path in (("dex", a.dex), ("vggface", a.vggface), ("imagenet", a.imagenet)) if path]
  if a.imdb:  # Table 2's imposed distributions, placed after DEX as in the paper
    c.priors[1:1] = imposed_dex_priors(a.dex, a.imdb, "morph", solver=c.optim.to_dict(), matched_target=target,
                                       fixed=fixed)
  return c
