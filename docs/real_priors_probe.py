"""The solver probe behind configs/utkface.py's `-tuned` priors (docs/real_priors.md): head-only fine-tuning of a
real age prior on its cached backbone features, for several optimisers, trials vmapped and steps scanned.

  python docs/real_priors_probe.py --prior priors/wrn --pad 0.4 --settings sgd:1e-4 sgd:1e-3 adam:1e-5 adam:1e-4
  python docs/real_priors_probe.py --prior priors/dlib --settings sgd:1e-4 sgd:1e-5 adam:1e-4 adam:1e-5:l1

A setting is OPT:LR[:LOSS]: `sgd` is the paper's solver (momentum 0.9, weight decay 5e-4, lr x0.1 every n steps),
`adam` a constant-lr Adam; LOSS is the head's own (default), `l1` (L1 on the expected age) or another softmax
loss of agejax.models.heads (`dldl_v2`, ...). The split is configs/utkface.py's (a seeded pool of --pool images,
--test test images); trial t of size n draws its n images and its batches from the seed (t, n), mirrored at
random; 5 n steps (at least 20) of 10 images. Prints the test MAE (mean +- SD over trials) per size.
"""

import argparse
import os
import sys

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

SIZES = ((3, 16), (12, 8), (48, 4), (192, 2))  # (images, trials)


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


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prior", required=True)
  ap.add_argument("--pad", type=float, default=0.0, help="data.pad_fraction (mirrored border)")
  ap.add_argument("--pool", type=int, default=400)
  ap.add_argument("--test", type=int, default=300)
  ap.add_argument("--settings", nargs="+", required=True)
  args = ap.parse_args()
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
  test_mae = lambda p: jnp.abs(head.decode(outputs(p, test)) - test_ages).mean()  # noqa: E731
  print(f"untouched {float(test_mae(start)):.2f}", flush=True)
  for setting in args.settings:
    kind, lr, loss = (setting.split(":") + [""])[:3]
    if loss == "l1":
      loss_fn = lambda out, y: jnp.abs(head.decode(out) - y)  # noqa: E731
    else:
      loss_fn = age_head({**spec, "head": loss} if loss else spec).loss
    cells = []
    for n, trials in SIZES:
      steps, tx = max(20, 5 * n), solver(kind, float(lr), n)
      idx, flip = np.zeros((trials, steps, 10), np.int32), np.zeros((trials, steps, 10), bool)
      for t in range(trials):
        rng = np.random.default_rng([0, t, n])
        subset = rng.choice(len(data.pool_ages), n, replace=False)
        idx[t], flip[t] = rng.choice(subset, (steps, 10)), rng.random((steps, 10)) < 0.5

      def trial(idx, flip, tx=tx, loss_fn=loss_fn):
        def step(carry, batch):
          params, state = carry
          i, m = batch
          x = jnp.where(m[:, None], mirrored[i], pool[i])
          grads = jax.grad(lambda p: loss_fn(outputs(p, x), pool_ages[i]).mean())(params)
          updates, state = tx.update(grads, state, params)
          return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (start, tx.init(start)), (idx, flip))
        return test_mae(params)

      maes = np.asarray(jax.jit(jax.vmap(trial))(jnp.asarray(idx), jnp.asarray(flip)))
      cells.append(f"{n}: {maes.mean():.2f} +- {maes.std():.2f}")
    print(setting, " | ".join(cells), flush=True)


if __name__ == "__main__":
  main()
