"""Is a fine-tuned trial's gain over its untouched prior more than the test set's sampling noise?
(docs/real_priors.md). Both predict the same test images of configs/utkface.py's runlocal split. The script
resamples those images with replacement and reports the paired MAE difference (trial - untouched): its mean, a
95% percentile interval, and the share of resamples where the trial is better.

  python docs/paired_bootstrap.py --prior priors/dlib --trial W/checkpoints/dlib-tuned/n00049_median
  python docs/paired_bootstrap.py --prior priors/wrn --pad 0.4 --trial W/checkpoints/wrn-tuned/n00049_median

`--trial` is a saved trial of the study (its workdir's `checkpoints/`, written for the best and median trial of
each size), `--pad` the prior's crop view (data.pad_fraction, mirrored border).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agejax.experiments.study_data import load_study_data  # noqa: E402
from agejax.predict import Predictor  # noqa: E402
from configs import utkface  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prior", required=True, help="the untouched prior directory")
  ap.add_argument("--trial", required=True, help="a saved trial (WORKDIR/checkpoints/PRIOR/nNNNNN_median)")
  ap.add_argument("--pad", type=float, default=0.0, help="data.pad_fraction of the prior's view")
  ap.add_argument("--resamples", type=int, default=10000)
  args = ap.parse_args()
  cfg = utkface.get_config("runlocal")
  cfg.data.update(pad_fraction=args.pad, pad_mode="reflect")
  data = load_study_data(cfg.data, 0)
  ages = np.asarray(data.test_ages, np.float64)
  # the study's test images are already model inputs (crop x crop), as agejax.predict's --aligned chips become
  base = np.abs(Predictor.load(args.prior).predict(data.test_images, 50)[0] - ages)
  trial = np.abs(Predictor.load(args.trial).predict(data.test_images, 50)[0] - ages)
  diff = trial - base  # per test image: positive where the trial is worse
  rng = np.random.default_rng(0)
  means = diff[rng.integers(0, len(diff), (args.resamples, len(diff)))].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  print(f"{len(ages)} test images: untouched MAE {base.mean():.3f}, trial MAE {trial.mean():.3f}")
  print(f"paired difference {diff.mean():+.3f} years, 95% interval [{lo:+.3f}, {hi:+.3f}] over {args.resamples} "
        f"resamples; the trial better in {np.mean(means < 0):.1%} of them; better on {np.mean(diff < 0):.0%} "
        f"and worse on {np.mean(diff > 0):.0%} of the images")


if __name__ == "__main__":
  main()
