"""Every age head inside the same few-shot trials: UTKFace with dlib's age ResNet as the prior.

One prior entry per head, all on dlib's backbone (`dlib=DIR`, ported with `agejax.port --format onnx
--arch dlib_resnet10`; README): the kept 81-bin DEX layer with its own loss and decoders (`keep-dex`,
`keep-dex-median`, and DLDL-v2 on the kept logits, `keep-dldl_v2`), and a new head of every kind (`new-<kind>`:
dex, dldl, dldl_v2, mean_variance, sord, coral, corn, regression; 101 bins 0..100, drawn per trial). Trial i of
every entry trains on the same images in the same order with the same crops (draws depend on the size and the
trial's seed only), so the heads are compared on identical draws. Results: docs/heads.md.

The backbone is frozen (`trials.freeze='backbone'`): its features are computed once per image (and its mirror)
and the trials train the head alone, with Adam at 1e-3 (one optimiser for every head) for max(5 n, 50) steps,
the step size dropping x0.1 for the last fifth. dlib's net reads the whole 64 px chip, so resize = crop = 64.

  python -m agejax.main --config configs/heads.py:runlocal,dlib=priors/dlib --workdir /tmp/heads
  python -m agejax.main --config configs/heads.py:dlib=DIR,heads=new-dex+new-coral --workdir /tmp/h2

Arguments: `runlocal` (sizes up to 768, at least 4 trials per size so each has an SD, a 4000-image pool, 1000
test images: minutes on 2 cores), `dlib=DIR`, `heads=A+B` (a subset of the entry names above), `max_size`, `pool`
(pool_limit; 0 keeps the default), `min_trials` (trials per size at least; default 4 with runlocal, else 1).
"""

import os

import ml_collections

from agejax.configs import SHARED_DATA, base_config, parse_arg, trials_for
from agejax.errors import ConfigError

NEW_KINDS = ("dex", "dldl", "dldl_v2", "mean_variance", "sord", "coral", "corn", "regression")
KEPT = {"keep-dex": dict(head_type="dex"),
        "keep-dex-median": dict(head_type="dex", head_options=dict(decode="median")),
        "keep-dldl_v2": dict(head_type="dldl_v2")}
HEAD_NAMES = (*KEPT, *(f"new-{k}" for k in NEW_KINDS))
SIZES = (3, 6, 12, 24, 48, 96, 192, 384, 768, 1536, 3072, 6144, 12288, 16384)


def head_entries(prior_dir: str, names: tuple[str, ...] = HEAD_NAMES) -> list[dict]:
  """One prior entry per head name, all on the prior at `prior_dir`."""
  out = []
  for name in names:
    if name in KEPT:
      out.append(dict(name=name, dir=prior_dir, head="keep", **KEPT[name]))
    elif name.startswith("new-") and name[4:] in NEW_KINDS:
      out.append(dict(name=name, dir=prior_dir, head="new", head_type=name[4:]))
    else:
      raise ConfigError(f"configs/heads.py: unknown head {name!r}; expected one of {', '.join(HEAD_NAMES)}")
  return out


def size_rows(max_size: int, min_trials: int = 1) -> tuple[tuple[int, int, int, int], ...]:
  """(n, trials, stepsize, max_iter): the paper's trial counts (at least `min_trials`), max(5 n, 50) steps, x0.1
  for the last fifth."""
  rows = []
  for n in SIZES:
    if n <= max_size:
      steps = max(5 * n, 50)
      rows.append((n, max(trials_for(n), min_trials), steps * 4 // 5, steps))
  return tuple(rows)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, runlocal=False, dlib="", heads="", max_size=0, pool=0, min_trials=0)
  if not a.dlib:
    raise ConfigError("configs/heads.py needs dlib=DIR, dlib's age ResNet ported with "
                      "`python -m agejax.port --format onnx --arch dlib_resnet10 age-v1.onnx DIR` (README)")
  c = base_config()
  c.title = "Age heads compared in the same few-shot trials (UTKFace, dlib's age ResNet)"
  c.data.update(name="utkface", root=os.path.join(SHARED_DATA, "UTKFace"), resize=64, crop=64,
                test_size=1000 if a.runlocal else 2000, dedupe=True, pool_limit=a.pool or (4000 if a.runlocal else 0))
  c.sizes = size_rows(a.max_size or (768 if a.runlocal else 16384), a.min_trials or (4 if a.runlocal else 1))
  names = tuple(filter(None, a.heads.split("+"))) or HEAD_NAMES
  c.priors = head_entries(a.dlib, names)
  c.model.head = "dex"
  c.model.init_age = 33.0  # a new regression head starts near the UTKFace mean
  c.optim = ml_collections.ConfigDict(dict(name="adam", base_lr=1e-3, gamma=0.1, rules=((".*", 1.0, 1.0),)))
  c.trials.freeze = "backbone"
  c.trials.parallel = "loop"
  c.trials.chunk_steps = 50
  c.eval_batch_size = 250
  c.save_trials = "none"
  return c
