"""The paper's LAP study (PROTOCOL.md §3, Table 1): few-shot learning curves on ChaLearn LAP 2015.

Pool = 80% of the 2476 train images (1981), each with 10 rotated versions drawn together; test = the
1136 validation images; sizes, trials and the Caffe solver (stepsize, max_iter) per size from the
authors' scripts; SGD lr 1e-4, momentum 0.9, weight decay 5e-4, step policy gamma 0.1, batch 10;
256 resize -> random 224 crop + mirror; per-layer multipliers conv x1/x2, fc x10/x20.
Priors are prior directories made with `agejax.port` (README): give at least one. With `imdb=PATH` (the
IMDB-WIKI folder with imdb.mat) and `dex=`, the Table 1 columns of imposed distributions are added: DEX
further trained on IMDB resampled to the uniform distribution, as it is, and to the LAP distribution
(agejax/experiments/pretrain.py; each stage is stored under WORKDIR/priors and reused by config hash).

  python -m agejax.main \\
      --config configs/lap.py:dex=priors/dex_imdb_wiki,vggface=priors/vggface,imagenet=priors/imagenet_vgg16 \\
      --workdir runs/lap --config.data.root=/data/chalearn_lap2015
  python -m agejax.main --config configs/lap.py:dex=priors/dex_imdb_wiki,imdb=/data/imdb_crop,imagenet=... \\
      --workdir runs/lap_table1 --config.data.root=/data/chalearn_lap2015
"""

import ml_collections

from agejax.configs import LAP_SOLVER, base_config, imposed_dex_priors, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dex="", vggface="", imagenet="", imdb="", runlocal=False)
  c = base_config()
  c.title = "LAP: adaptation of deep priors (paper Table 1)"
  c.data.update(name="lap", root="", resize=256, crop=224, use_dataset_split=True, pool_fraction=0.8,
                rotation_angles=(-10.0, -7.5, -5.0, -2.5, -1.0, 1.0, 2.5, 5.0, 7.5, 10.0))
  c.sizes = [(n, trials, stepsize, max_iter) for _, n, trials, stepsize, max_iter in LAP_SOLVER]
  c.priors = []
  if a.dex:
    c.priors.append(dict(name="dex", dir=a.dex, head="keep"))
  if a.imdb:  # Table 1's imposed distributions: DEX further trained on resampled IMDB
    c.priors.extend(imposed_dex_priors(a.dex, a.imdb, "lap", solver=c.optim.to_dict()))
  if a.vggface:
    c.priors.append(dict(name="vggface", dir=a.vggface, head="new"))
  if a.imagenet:
    c.priors.append(dict(name="imagenet", dir=a.imagenet, head="new"))
  if a.runlocal:
    c.steps_scale = 0.05
    c.min_steps = 5
    c.sizes = c.sizes[:5]
  return c
