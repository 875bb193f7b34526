"""The paper's LAP study (docs/protocol.md, Table 1): few-shot learning curves on ChaLearn LAP 2015.

Pool = 1981 of the 2476 train images, each with 10 rotated versions drawn together; test = the 1136
validation images; sizes, trials and the Caffe solver (stepsize, max_iter) per portion from the authors'
scripts (agejax.configs.LAP_SOLVER); SGD lr 1e-4, momentum 0.9, weight decay 5e-4, step policy gamma 0.1,
batch 10; 256 resize -> random 224 crop + mirror; per-layer multipliers conv x1/x2, fc x10/x20.
Priors are prior directories made with `agejax.port` (README): give at least one.

Split: `lists=DIR` (config.data.split_lists) reads the authors' fixed lists chalearn_train_80.txt (pool) and
chalearn_validation.txt (test) from DIR, as in the paper; without it, a seeded 80% of the train split.

With `imdb=PATH` (the IMDB-WIKI folder with imdb.mat) and `dex=`, the Table 1 columns of imposed distributions
are added: DEX further trained on IMDB resampled to the uniform distribution, as it is, and to the LAP
distribution (agejax/experiments/pretrain.py; each stage is stored under WORKDIR/priors and reused by config
hash). As the authors ran it (`target=test`, the default here), the matched stage imposes the age histogram of
the TEST set (the 1136 validation labels): it READS TEST LABELS. `target=pool` imposes the training pool's
histogram instead (no test label is seen). `stop=fixed` (default) runs the authors' fixed 250k steps of 15
images, the lr x0.1 every 100k; `stop=converge` stops early on held-out IMDB instead.

  python -m agejax.main --workdir runs/lap --config.data.root=/data/chalearn_lap2015 \\
      --config configs/lap.py:dex=priors/dex,vggface=priors/vggface,imagenet=priors/imagenet_vgg16,lists=/data/lists
  python -m agejax.main --workdir runs/lap_table1 --config.data.root=/data/chalearn_lap2015 \\
      --config configs/lap.py:dex=priors/dex,imdb=/data/imdb_crop,lists=/data/lists
  python -m agejax.reports.compare --paper lap --workdir runs/lap_table1 \\
      --authors AUTHORS/LAP/fine-tuning/Part_1/Learning_curve_results \\
                AUTHORS/LAP/fine-tuning/Part_2/Learning_curve_results

(priors/dex is the DEX prior ported with `agejax.port --format caffe`; /data/lists holds the authors'
LAP/fine-tuning/Part_1/ChaLearn_datasets files; AUTHORS is a copy of their repository.)
"""

import ml_collections

from agejax.configs import (
  LAP_SOLVER,
  PAPER_ROTATIONS,
  base_config,
  imposed_dex_priors,
  paper_options,
  parse_arg,
  solver_sizes,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dex="", vggface="", imagenet="", imdb="", lists="", target="test", stop="fixed", runlocal=False)
  target, fixed = paper_options(a.target, a.stop)
  c = base_config()
  c.title = "LAP: adaptation of deep priors (paper Table 1)"
  c.data.update(name="lap", root="", resize=256, crop=224, use_dataset_split=True, pool_fraction=0.8,
                rotation_angles=PAPER_ROTATIONS)
  c.data.split_lists = a.lists  # '' = the seeded split
  c.sizes = solver_sizes(LAP_SOLVER)
  c.priors = []
  if a.dex:
    c.priors.append(dict(name="dex", dir=a.dex, head="keep"))
  if a.imdb:  # Table 1's imposed distributions: DEX further trained on resampled IMDB
    c.priors.extend(imposed_dex_priors(a.dex, a.imdb, "lap", solver=c.optim.to_dict(), matched_target=target,
                                       fixed=fixed))
  if a.vggface:
    c.priors.append(dict(name="vggface", dir=a.vggface, head="new"))
  if a.imagenet:
    c.priors.append(dict(name="imagenet", dir=a.imagenet, head="new"))
  if a.runlocal:
    c.steps_scale = 0.05
    c.min_steps = 5
    c.sizes = c.sizes[:5]
  return c
