"""The calibration variants behind configs/utkface.py's `-tuned` priors (docs/real_priors.md, "Calibrating the
kept head"): the runlocal study's draws, sizes and steps, with each real prior's head frozen or trained around an
output calibration scale (a - 33) + 33 + shift of its expected age a (agejax.models.heads.CalibratedHead).

  python -m agejax.main --config docs/real_priors_variants.py:wrn=priors/wrn,dlib=priors/dlib --workdir W

Entries: `wrn-head` (the head alone, Adam 1e-4: the earlier wrn-tuned), `wrn-calib` (the calibration alone, Adam
3e-3), `wrn-calib-head` (both: the head at Adam 1e-4, the calibration at 30x, = wrn-tuned); `dlib-head` (the head
alone, the paper's SGD at lr 1e-5: the earlier dlib-tuned), `dlib-calib` (the calibration alone at Adam 3e-4,
= dlib-tuned), `dlib-calib-1e-3` (at Adam 1e-3), `dlib-calib-head` (both, the head at Adam 1e-5).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agejax.configs import paper_solver, parse_arg  # noqa: E402
from configs import utkface  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, wrn="", dlib="")
  if not (a.wrn or a.dlib):
    raise ValueError("give wrn=DIR and/or dlib=DIR (priors ported with agejax.port; README 'Real age priors')")
  c = utkface.get_config(f"runlocal,wrn={a.wrn},dlib={a.dlib},scratch=False,paper=False")
  kept = {name: {k: v for k, v in dict(p).items() if k not in ("name", "freeze", "optim", "head_options")}
          for name, p in zip(("wrn", "dlib") if a.wrn else ("dlib",), c.priors)}
  calibrated = dict(freeze="backbone", head_options=dict(calibrate=33.0))
  adam = utkface.adam_solver
  variants = {
      "wrn": {"wrn-head": dict(freeze="backbone", optim=adam(1e-4, ((".*", 1.0, 1.0),))),
              "wrn-calib": calibrated | dict(optim=adam(3e-3, utkface.CALIBRATION_ONLY)),
              "wrn-calib-head": calibrated | dict(optim=adam(1e-4, utkface.CALIBRATION_AND_HEAD))},
      "dlib": {"dlib-head": dict(freeze="backbone", optim=paper_solver(1e-5)),
               "dlib-calib": calibrated | dict(optim=adam(3e-4, utkface.CALIBRATION_ONLY)),
               "dlib-calib-1e-3": calibrated | dict(optim=adam(1e-3, utkface.CALIBRATION_ONLY)),
               "dlib-calib-head": calibrated | dict(optim=adam(1e-5, utkface.CALIBRATION_AND_HEAD))},
  }
  c.priors = [kept[prior] | {"name": name} | entry for prior in kept for name, entry in variants[prior].items()]
  c.title = "Calibration variants of the real age priors (UTKFace runlocal draws)"
  return c
