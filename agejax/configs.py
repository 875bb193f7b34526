"""Helpers shared by the config files in configs/ (big_vision style `get_config(arg)`)."""

import os
from typing import Any

import ml_collections

from agejax.engine.optim import CAFFE_VGG_RULES
from agejax.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

# The paper's LAP solver table (docs/protocol.md, the few-shot learning curve): (portion of the 1981-image LAP
# pool, images, trials, stepsize, max_iter).
LAP_SOLVER = (
    (0.00125, 3, 32, 3, 15), (0.0025, 6, 32, 7, 35), (0.00375, 9, 32, 10, 50), (0.005, 12, 32, 13, 65),
    (0.01, 24, 16, 25, 125), (0.02, 49, 8, 50, 250), (0.04, 99, 4, 100, 500), (0.08, 198, 2, 200, 1000),
    (0.16, 396, 1, 400, 2000), (0.2, 495, 1, 500, 2500), (0.4, 990, 1, 1000, 5000), (0.8, 1981, 1, 2000, 10000),
)
# docs/protocol.md: the MORPH 2 rows, read from the authors' per-trial solver files. The portions are LAP's plus
# two smaller ones (0.000625, 0.0017), of the 4380-image pool; the solver is keyed to the portion, not to the
# image count, so a MORPH size trains on fewer steps per image than LAP's (the paper's 'bump' near 20 images).
MORPH_SOLVER = (
    (0.000625, 3, 32, 2, 10), (0.00125, 6, 32, 3, 15), (0.0017, 9, 32, 4, 20), (0.0025, 13, 32, 7, 35),
    (0.00375, 20, 32, 10, 50), (0.005, 27, 32, 13, 65), (0.01, 54, 16, 25, 125), (0.02, 109, 8, 50, 250),
    (0.04, 219, 4, 100, 500), (0.08, 438, 2, 200, 1000), (0.16, 876, 1, 400, 2000), (0.2, 1095, 1, 500, 2500),
    (0.4, 2190, 1, 1000, 5000), (0.8, 4380, 1, 2000, 10000),
)
MORPH_SIZES = tuple(row[1] for row in MORPH_SOLVER)
# The paper configs' tables and pools by dataset (agejax.reports.compare maps the authors' portions with them).
PAPER_SOLVERS = {"lap": LAP_SOLVER, "morph": MORPH_SOLVER}
PAPER_POOLS = {"lap": 1981, "morph": 4380}
# Every training image is stored with 10 rotated versions (11 in all), drawn together, for LAP and MORPH 2.
PAPER_ROTATIONS = (-10.0, -7.5, -5.0, -2.5, -1.0, 1.0, 2.5, 5.0, 7.5, 10.0)
# The authors' fixed-length pre-training stages (their solver files and job scripts, docs/protocol.md): SGD at
# lr 1e-4, step policy gamma 0.1, 5 images on each of 3 GPUs (Caffe averages the GPUs' gradients: 15 a step),
# no early stopping. Source samples -> (stepsize, max_iter); 0 = the whole matched source (250k steps, the lr
# dropping x0.1 every 100k). The sized stages scale the full stage's counts by samples / 368,553.
AUTHORS_STAGE_BATCH = 15
AUTHORS_STAGE_SOLVER = {0: (100000, 250000), 100: (27, 68), 1000: (271, 678), 10000: (2713, 6783)}


def portion_images(pool: int, portion: float) -> int:
  """Training images of a portion as the authors drew them: int(pool * portion / 0.8) (0.8 = the whole pool)."""
  return int(pool * portion / 0.8)


def solver_sizes(table: tuple[tuple, ...]) -> list[tuple[int, int, int, int]]:
  """`config.sizes` rows (n, trials, stepsize, max_iter) of a (portion, n, trials, stepsize, max_iter) table."""
  return [(n, trials, stepsize, max_iter) for _, n, trials, stepsize, max_iter in table]


def authors_stage_solver(samples: int) -> dict[str, Any]:
  """The `pretrain` fields of the authors' fixed-length stage imposing a distribution from `samples` source
  samples (0 = all): stop='fixed', their max_iter as `steps`, their lr `stepsize` and 15 images a step."""
  if samples not in AUTHORS_STAGE_SOLVER:
    raise ConfigError(f"the authors ran fixed-length stages for {sorted(AUTHORS_STAGE_SOLVER)} source samples "
                      f"(0 = all), not {samples}; use stop='converge' for other sizes")
  stepsize, max_iter = AUTHORS_STAGE_SOLVER[samples]
  return dict(stop="fixed", steps=max_iter, stepsize=stepsize, batch_size=AUTHORS_STAGE_BATCH)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'runlocal,res=64,dex=/p' -> ConfigDict; bare words are True; values typed like their defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    if not eq:
      out[key] = True
      continue
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def trials_for(n: int, smallest_trials: int = 32, first_full: int = 12) -> int:
  """The paper's halving scheme: 32 trials up to ~12 images, then halving per doubling, at least 1."""
  if n <= first_full:
    return smallest_trials
  trials = smallest_trials
  size = first_full
  while size < n and trials > 1:
    size *= 2
    trials //= 2
  return max(trials, 1)


def scaled_sizes(sizes: list[int], steps_per_image: int = 5, smallest_trials: int = 32) -> list[tuple]:
  """(n, trials, stepsize, max_iter) rows with the LAP solver's scaling: stepsize ~ n, max_iter ~ 5 n."""
  return [(n, trials_for(n, smallest_trials), max(n, 1), steps_per_image * n) for n in sizes]


def data_section(**fields: Any) -> ml_collections.ConfigDict:
  """The `data` fields every study reads (agejax.experiments.study_data, the trials' augmentation) with their
  defaults, `fields` laid over them. A pre-training stage's and a prior's own `data` are merged over it."""
  return ml_collections.ConfigDict(dict(
      name="synthetic",  # the source: one of study_data.SOURCES
      root="",  # the dataset's folder (a CSV for 'generic'); unused by 'synthetic'
      resize=256,  # images are decoded and resized to resize x resize
      crop=224,  # the trials' (random or centre) crop of each resized image
      mirror=True,  # random horizontal flips in training
      random_crop=True,  # a random crop offset in training (False: the centre)
      policy="skip",  # a bad input: 'skip' (dropped, named in data_report.json) or 'strict' (stop)
      cache_dir="",  # the decoded-image cache ('': agejax.data.cache.default_cache_dir(); 'none': no cache)
      test_size=0,  # test images (0: test_fraction of the records; the synthetic test set's size)
      test_fraction=0.2,
      dedupe=True,  # exact duplicates grouped before the split, so no copy of a test image is in the pool
      rotation_angles=(),  # each pool image stored with these rotated versions too, drawn together (LAP)
      pool_limit=0,  # a seeded random part of the pool of this many base images (0: all of it)
      max_records=0,  # a seeded random part of the records before anything else (0: all)
      select={},  # keep records whose fields take one of the listed values, e.g. {'race': (2,)}
      reader_options={},  # keyword arguments of the dataset's reader (agejax.data.readers)
      pool_size=400,  # 'synthetic': pool images
      skew=0.0,  # 'synthetic': the age distribution's tilt (> 0 favours the young)
      split_lists="",  # a folder of the authors' fixed pool/test lists ('': a seeded split)
      split_column=False,  # records carrying their own train/test split (a CSV column) are split by it
      use_dataset_split=False,  # the dataset's own train/valid split (always for 'lap'): pool from train
      pool_fraction=0.8,  # ... the pool being this seeded fraction of the train split
      # How each image is framed before the resize (agejax.data.images.adapt_crop; a prior's own `data` may set
      # these, study_data.VIEW_FIELDS): the central crop_fraction of each side kept, then each side padded by
      # pad_fraction of it ('edge' or 'reflect'), then resized by resize_mode (images.RESIZE_MODES).
      resize_mode="squash", pad_fraction=0.0, pad_mode="edge", crop_fraction=1.0,
  ) | fields)


def base_config() -> ml_collections.ConfigDict:
  """Fields every learning-curve config has (the learning-curve defaults of docs/protocol.md)."""
  c = ml_collections.ConfigDict()
  c.study = "learning_curve"
  c.title = "Few-shot learning curve"
  c.seed = 0
  c.data = data_section()
  c.model = ml_collections.ConfigDict(dict(
      head="dex", preprocess=dict(channel_order="BGR", scale=255.0, mean=(104.0, 117.0, 123.0),
                                  std=(1.0, 1.0, 1.0), resize=256, crop=224)))
  c.priors = []
  c.sizes = ()  # a tuple of (n, trials, stepsize, max_iter), so --config.sizes=... can replace it
  c.steps_scale = 1.0
  c.min_steps = 1
  c.batch_size = 10
  c.optim = ml_collections.ConfigDict(dict(
      name="caffe_sgd", base_lr=1e-4, momentum=0.9, weight_decay=5e-4, gamma=0.1, rules=CAFFE_VGG_RULES))
  # conv_impl: 'auto' (per-layer choice by measurement, agejax.engine.autotune), 'lax', 'canonical',
  # 'patches', or 'spec' (whatever the prior's model spec says). compute_dtype: 'float32' or 'bfloat16'
  # (bf16 compute, float32 master weights). memory_budget_gb: 0 = the device's memory; trials that do not
  # fit it together are trained in chunks (agejax.engine.memory).
  # auto_candidates: the strategies 'auto' measures (empty: agejax.engine.trials.default_candidates).
  # conv_plan: an earlier run's conv_plan.json to follow instead of timing the convolutions afresh.
  # freeze: 'none' (every layer trains), 'backbone' (the head only) or a backbone stage name (the stages before it
  # are frozen; priors[i].freeze wins): the frozen prefix's outputs are cached once per image and augmentation
  # variant (agejax.engine.features); cached_crops: crop offsets cached per axis (0 or 1: the centre; -1: all).
  c.trials = ml_collections.ConfigDict(dict(parallel="auto", trial_chunk=0, chunk_steps=50,
                                            auto_candidates=(), conv_impl="auto", conv_plan="",
                                            compute_dtype="float32", memory_budget_gb=0.0,
                                            freeze="none", cached_crops=0))
  # Devices (agejax.parallel.sharding): 'trial' axis size (0 = all devices when a group has that many trials)
  # x 'data' (splits each trial's batch); cpu_devices: CPU devices the process makes (0 = one per core, up to
  # 8; agejax.parallel.distributed), so that trial blocks train concurrently on a CPU.
  # Checkpoints inside a size (agejax.engine.checkpoint, workdir/ckpt/): every `every_chunks` chunks and at
  # group ends, the last `keep` kept; a single-model fit (pre-training stages) every `every_steps` steps.
  c.mesh = ml_collections.ConfigDict(dict(trial=0, data=1, cpu_devices=0))
  c.checkpoint = ml_collections.ConfigDict(dict(enabled=True, every_chunks=10, every_steps=500, keep=2,
                                                  async_save=True))
  c.eval_batch_size = 64
  c.eval_size_zero = True
  c.save_trials = "best_median"
  c.progress = True
  c.log_trial_losses = True
  c.diagnostics = True  # WORKDIR/diagnostics: split and resampled-source histograms, duplicates
  c.overwrite = False  # a workdir holding another config's results: replace them (agejax.reports.workdir)
  # The trial states save_trials keeps stay in host memory up to this many MB, beyond it staged on disk.
  c.keep_states_mb = 2048
  return c


def tiny_vgg(width: float = 1 / 16, fc_dim: int = 64, conv_impl: str = "lax") -> dict[str, Any]:
  """A VGG-16 with every layer narrowed, for CPU runs and tests."""
  return dict(arch="vgg16", head="dex", backbone=dict(width=width, fc_dim=fc_dim, conv_impl=conv_impl))


# Adam lr multipliers for fine-tuning a pretrained backbone: the head learns 10x faster than the backbone.
HEAD_X10_RULES = ((r"^head/", 10.0, 1.0), (".*", 1.0, 1.0))
# The authors' fine-tuning multipliers (CAFFE_VGG_RULES: the last layer x10, biases x2 without decay) for any
# backbone whose age layer is the model's `head` (the real age priors keep theirs).
DEX_HEAD_RULES = ((r"^head/.*kernel$", 10.0, 1.0), (r"^head/.*bias$", 20.0, 0.0), (r"/bias$", 2.0, 0.0),
                  (".*", 1.0, 1.0))


def paper_solver(base_lr: float = 1e-4) -> dict[str, Any]:
  """The paper's fine-tuning solver (docs/protocol.md section 3): Caffe SGD, momentum 0.9, weight decay 5e-4,
  step policy gamma 0.1, the age layer at 10x (DEX_HEAD_RULES)."""
  return dict(name="caffe_sgd", base_lr=base_lr, momentum=0.9, weight_decay=5e-4, gamma=0.1, rules=DEX_HEAD_RULES)


def lap_protocol_sizes(max_size: int = 0) -> tuple[tuple[int, int, int, int], ...]:
  """The LAP table's (n, trials, stepsize, max_iter) rows up to `max_size` images (0: all): the paper's sizes,
  trial counts and per-size solver, to run on a pool of PAPER_POOLS['lap'] images."""
  return tuple(row for row in solver_sizes(LAP_SOLVER) if not max_size or row[0] <= max_size)


def transfer_config() -> ml_collections.ConfigDict:
  """Fields every transfer-study config has (the transfer-study defaults of docs/protocol.md;
  agejax/experiments/transfer.py)."""
  c = ml_collections.ConfigDict()
  c.study = "transfer"
  c.title = "Transfer learning: frozen vs full fine-tuning"
  c.seed = 0
  # The pool's split into training and validation images (agejax.experiments.transfer.load_splits): val_size base
  # images held out (0: val_fraction of the pool), train_size of the rest trained on (0: all of them).
  c.data = data_section(crop=256, random_crop=False, val_size=0, val_fraction=0.25, train_size=0)
  c.backbones = []
  c.modes = ("frozen", "full")
  c.model = ml_collections.ConfigDict(dict(
      head="regression", regression_hidden=(512, 128), init_age=35.0,
      preprocess=dict(channel_order="RGB", scale=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))))
  c.optim = ml_collections.ConfigDict(dict(name="adam", base_lr=1e-3, gamma=0.1, weight_decay=0.0,
                                           rules=((".*", 1.0, 1.0),)))
  c.lr = ml_collections.ConfigDict(dict(frozen=1e-3, full=1e-4))  # Adam's base_lr per mode
  c.epochs = 10
  c.lr_decay_epochs = 4  # lr x optim.gamma every this many epochs (0: constant)
  c.patience = 0  # stop after this many epochs without a better validation MAE (0: run all epochs)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.progress = True
  c.diagnostics = True
  c.diagnostics_options = ml_collections.ConfigDict(dict(gross=40.0, band=(15.0, 20.0), near=True))
  c.mesh = ml_collections.ConfigDict(dict(cpu_devices=0))  # CPU devices the process makes (as base_config's)
  return c


# IMDB as the paper used it for imposing distributions (docs/protocol.md): every IMDB face crop with an age in
# 0..100 (no face-score filter), split 80% train / 10% validation / 10% test.
IMDB_ALL_READER = dict(face_score_min=None, require_single_face=False, require_gender=False, min_age=0, max_age=100)


def source_data(name: str, root: str, **fields: Any) -> dict[str, Any]:
  """A pre-training source's `data` section; fields a target's config.data may hold are reset to neutral values."""
  return dict(name=name, root=root, rotation_angles=(), use_dataset_split=False, select={}, pool_limit=0,
              max_records=0, test_size=0, test_fraction=0.1, reader_options={}, split_lists="",
              split_column=False) | fields


IMPOSE_TARGETS = ("pool", "test")  # whose age histogram a 'matched' stage imposes (distribution.target)
STAGE_STOPS = ("fixed", "converge")  # pretrain.stop


def paper_options(target: str, stop: str) -> tuple[str, bool]:
  """(distribution.target, authors' fixed-length stages?) from a paper config's `target=` and `stop=` arguments."""
  if target not in IMPOSE_TARGETS:
    raise ValueError(f"target={target!r}: expected one of {', '.join(IMPOSE_TARGETS)}")
  if stop not in STAGE_STOPS:
    raise ValueError(f"stop={stop!r}: expected one of {', '.join(STAGE_STOPS)}")
  return target, stop == "fixed"


def impose_stage(source: dict[str, Any], mode: str | None, total: int = 0, multiple: float = 1.0,
                 stop: str = "converge", epochs: float = 10.0, target: str = "pool", **fields: Any) -> dict[str, Any]:
  """A `pretrain` section that trains on `source` resampled to `mode` (None: the source as is), see pretrain.py.

  target: for 'matched', the study's training pool ('pool', the default: no test label is read) or its test set
  ('test', as the authors did); written into the section only when it is 'test', so 'pool' stages keep their hash.
  """
  if target not in IMPOSE_TARGETS:
    raise ConfigError(f"distribution.target must be one of {IMPOSE_TARGETS}, got {target!r}")
  stage = dict(data=source, stop=stop, epochs=epochs, patience=3, val_fraction=0.1) | fields
  if mode is not None:
    stage["distribution"] = dict(mode=mode, total=total, multiple=multiple)
    if mode == "matched" and target != "pool":
      stage["distribution"]["target"] = target
  return stage


def imposed_dex_priors(dex: str, imdb: str, target: str, solver: dict[str, Any] | None = None,
                       matched_target: str = "pool", fixed: bool = False) -> list[dict]:
  """The paper's imposed-distribution columns (Tables 1-2): DEX further trained on IMDB resampled to the uniform
  distribution (eq. 2, 4 N samples, one epoch at lr 1e-5), as it is (to convergence) and to the target's
  distribution (eq. 3, 4 N samples). Convergence = early stopping on 10% of IMDB held out.

  matched_target: the histogram the matched stage imposes, 'pool' or 'test' (the authors': it reads the test
  labels). fixed: the matched stage runs the authors' fixed 250k steps of 15 images on 80% of IMDB
  (authors_stage_solver(0)) instead of stopping early. The authors' code has no solver for the uniform and
  original stages, so those follow the paper's text either way.
  """
  source = source_data("imdb_wiki", imdb, test_fraction=0.1, reader_options=IMDB_ALL_READER)
  solver = dict(solver or {})
  optim = {"optim": solver} if solver else {}
  uniform_solver = solver | {"base_lr": 1e-5} if solver else {}
  if fixed:  # 80% of IMDB is the source pool (the paper's 80/10/10 split), no validation part
    matched = impose_stage(source | {"test_fraction": 0.2}, "matched", multiple=4.0, target=matched_target,
                           **authors_stage_solver(0), **optim)
  else:
    matched = impose_stage(source, "matched", multiple=4.0, val_fraction=1 / 9, target=matched_target, **optim)
  stages = (("imdb-uniform", impose_stage(source, "uniform", multiple=4.0, stop="fixed", epochs=1.0,
                                          **({"optim": uniform_solver} if uniform_solver else {}))),
            ("imdb-original", impose_stage(source, None, val_fraction=1 / 9, **optim)),
            (f"imdb-{target}-matched", matched))
  return [dict(name=name, dir=dex, head="keep", pretrain=stage | {"head": "keep"}) for name, stage in stages]


def sample_size_priors(start_dir: str, source: dict[str, Any], target: str, sizes: tuple[int, ...],
                       batch_size: int, matched_target: str = "pool", fixed: bool = False, **stage: Any) -> list[dict]:
  """The paper's Tables 3-4 columns: the start prior with the target distribution imposed from `sizes` source
  samples each (0 = all of the source's training part, drawn 4x as in eq. 3), trained to convergence, or with
  `fixed` for the authors' fixed step counts (authors_stage_solver; `batch_size` is then theirs, 15).
  matched_target: 'pool' or 'test' (the authors': it reads the test labels)."""
  out = []
  for n in sizes:
    if fixed:
      section = impose_stage(source | ({"test_fraction": 0.2} if not n else {}), "matched", total=n,
                             multiple=4.0 if not n else 1.0, target=matched_target, head="keep",
                             **(authors_stage_solver(n) | stage))
    else:
      every = max(10, n // batch_size) if n else 0  # validate at least every 10 steps on small draws
      section = impose_stage(source, "matched", total=n, multiple=4.0 if not n else 1.0, eval_every=every,
                             batch_size=batch_size, head="keep", target=matched_target, **stage)
    out.append(dict(name=f"{target}-matched-{n if n else 'all'}", dir=start_dir, head="keep", pretrain=section))
  return out
