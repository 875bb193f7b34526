"""The solver probe behind configs/utkface.py's `-tuned` priors (docs/real_priors.md): head-only fine-tuning of a
real age prior on its cached backbone features, for several optimisers, trials vmapped and steps scanned.

  python docs/real_priors_probe.py --prior priors/wrn --pad 0.4 --settings sgd:1e-4 sgd:1e-3 adam:1e-5 adam:1e-4
  python docs/real_priors_probe.py --prior priors/dlib --bands --settings sgd:1e-5 adam:1e-3:dex:bias adam:1e-4::calib

A setting is OPT:LR[:LOSS[:PART]]: `sgd` is the paper's solver (momentum 0.9, weight decay 5e-4, lr x0.1 every n
steps), `adam` a constant-lr Adam; LOSS is the head's own (default), `l1` (L1 on the expected age) or another
softmax loss of agejax.models.heads (`dldl_v2`, ...); PART is what trains: `head` (default, the whole head),
`bias` (the head's bias only) or `calib` (an output calibration a (E - 33) + 33 + b of the expected age E, starting
at a = 1, b = 0, trained by L1 with the head fixed). The split is configs/utkface.py's (a seeded pool of --pool
images, --test test images); trial t of size n draws its n images and its batches from the seed (t, n), mirrored at
random; 5 n steps (at least 20) of 10 images, for each of --sizes (default 3 12 48 192) with --trials trials.
Prints the test MAE (mean +- SD over trials) per size; `--bands` first prints the untouched net's test MAE and mean
signed error per age band.
"""

import argparse
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agejax.experiments.study_data import load_study_data  # noqa: E402
from agejax.models import load_pretrained  # noqa: E402
from agejax.models.heads import age_head  # noqa: E402
from agejax.models.pretrained import read_prior_metadata  # noqa: E402
from configs import utkface  # noqa: E402

SIZES = (3, 12, 48, 192)  # images per trial (--sizes)
BANDS = (0, 3, 13, 20, 30, 40, 50, 60, 70, 80, 200)  # age band edges of --bands
CENTRE = 33.0  # the calibration's fixed point, about UTKFace's mean age (a changes the spread around it)


def backbone_features(prior_dir: str, images: np.ndarray, batch: int = 50) -> np.ndarray:
  model, variables, preprocess = load_pretrained(prior_dir)
  run = jax.jit(lambda x: model.apply(variables, preprocess(x), method=lambda m, x: m.backbone(x, train=False)))
  return np.concatenate([np.asarray(run(jnp.asarray(images[i:i + batch]))) for i in range(0, len(images), batch)])


def solver(kind: str, lr: float, n: int) -> optax.GradientTransformation:
  if kind == "sgd":
    schedule = optax.exponential_decay(lr, n, 0.1, staircase=True)
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9))
  if kind == "adam":
    return optax.adam(lr)
  raise SystemExit(f"unknown optimiser {kind!r}: sgd or adam")


def print_bands(pred: np.ndarray, ages: np.ndarray) -> None:
  """The test MAE and mean signed error (prediction - age) overall and per age band."""
  err = pred - ages
  print(f"untouched: MAE {np.abs(err).mean():.2f}, mean signed error {err.mean():+.2f} on {len(ages)} test images")
  for lo, hi in zip(BANDS, BANDS[1:]):
    band = (ages >= lo) & (ages < hi)
    if band.any():
      print(f"  ages {lo}-{hi - 1}: {band.sum()} images, MAE {np.abs(err[band]).mean():.2f}, "
            f"signed {err[band].mean():+.2f}, {np.abs(err[band]).sum() / np.abs(err).sum():.0%} of the total error")


def trained_part(part: str, start: dict) -> tuple[dict, dict]:
  """(initial parameters {'head', 'calib'}, a 0/1 gradient mask over them) for a setting's PART."""
  params = {"head": start, "calib": jnp.array([1.0, 0.0])}
  on = lambda tree, value: jax.tree.map(lambda x: jnp.full_like(x, value), tree)  # noqa: E731
  if part in ("", "head"):
    return params, {"head": on(start, 1.0), "calib": on(params["calib"], 0.0)}
  if part == "bias":
    head = flax.traverse_util.path_aware_map(lambda path, x: jnp.full_like(x, path[-1] == "bias"), start)
    return params, {"head": head, "calib": on(params["calib"], 0.0)}
  if part == "calib":
    return params, {"head": on(start, 0.0), "calib": on(params["calib"], 1.0)}
  raise SystemExit(f"unknown part {part!r}: head, bias or calib")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prior", required=True)
  ap.add_argument("--pad", type=float, default=0.0, help="data.pad_fraction (mirrored border)")
  ap.add_argument("--pool", type=int, default=400)
  ap.add_argument("--test", type=int, default=300)
  ap.add_argument("--settings", nargs="+", required=True)
  ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="images per trial (at most --pool)")
  ap.add_argument("--trials", type=int, nargs="+", default=(16, 8, 4, 2), help="trials at each of --sizes")
  ap.add_argument("--bands", action="store_true", help="first the untouched net's test errors per age band")
  args = ap.parse_args()
  if len(args.trials) != len(args.sizes) or max(args.sizes) > args.pool:
    raise SystemExit(f"--trials needs one count per size ({len(args.sizes)}), and --sizes at most --pool ({args.pool})")
  cfg = utkface.get_config("runlocal")
  cfg.data.update(pool_limit=args.pool, test_size=args.test, pad_fraction=args.pad, pad_mode="reflect")
  data = load_study_data(cfg.data, 0)
  pool = jnp.asarray(backbone_features(args.prior, data.pool_images))
  mirrored = jnp.asarray(backbone_features(args.prior, data.pool_images[:, :, ::-1]))
  test = jnp.asarray(backbone_features(args.prior, data.test_images))
  pool_ages, test_ages = jnp.asarray(data.pool_ages), jnp.asarray(data.test_ages)
  model, variables, _ = load_pretrained(args.prior)
  spec = read_prior_metadata(args.prior)["model"]
  head, start = age_head(spec), variables["params"]["head"]
  outputs = lambda p, x: model.head.apply({"params": p}, x)  # noqa: E731
  calibrated = lambda p, x: p["calib"][0] * (head.decode(outputs(p["head"], x)) - CENTRE) + CENTRE + p["calib"][1]  # noqa: E731
  test_mae = lambda p: jnp.abs(calibrated(p, test) - test_ages).mean()  # noqa: E731
  if args.bands:
    print_bands(np.asarray(head.decode(outputs(start, test))), data.test_ages)
  print(f"untouched {float(test_mae(trained_part('', start)[0])):.2f}", flush=True)
  for setting in args.settings:
    kind, lr, loss, part = (setting.split(":") + ["", ""])[:4]
    if loss == "l1" or part == "calib":
      loss_fn = lambda p, x, y: jnp.abs(calibrated(p, x) - y)  # noqa: E731
    else:
      head_loss = age_head({**spec, "head": loss} if loss else spec).loss
      loss_fn = lambda p, x, y, head_loss=head_loss: head_loss(outputs(p["head"], x), y)  # noqa: E731
    params0, mask = trained_part(part, start)
    cells = []
    for n, trials in zip(args.sizes, args.trials):
      steps, tx = max(20, 5 * n), solver(kind, float(lr), n)
      idx, flip = np.zeros((trials, steps, 10), np.int32), np.zeros((trials, steps, 10), bool)
      for t in range(trials):
        rng = np.random.default_rng([0, t, n])
        subset = rng.choice(len(data.pool_ages), n, replace=False)
        idx[t], flip[t] = rng.choice(subset, (steps, 10)), rng.random((steps, 10)) < 0.5

      def trial(idx, flip, tx=tx, loss_fn=loss_fn, params0=params0, mask=mask):
        def step(carry, batch):
          params, state = carry
          i, m = batch
          x = jnp.where(m[:, None], mirrored[i], pool[i])
          grads = jax.grad(lambda p: loss_fn(p, x, pool_ages[i]).mean())(params)
          grads = jax.tree.map(jnp.multiply, grads, mask)  # the parts PART does not train stay as they are
          updates, state = tx.update(grads, state, params)
          updates = jax.tree.map(jnp.multiply, updates, mask)  # (nor does the SGD weight decay move them)
          return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params0, tx.init(params0)), (idx, flip))
        return test_mae(params)

      maes = np.asarray(jax.jit(jax.vmap(trial))(jnp.asarray(idx), jnp.asarray(flip)))
      cells.append(f"{n}: {maes.mean():.3f} +- {maes.std():.3f}")
    print(setting, " | ".join(cells), flush=True)

if __name__ == "__main__":
  main()
