"""agejax: fast, reproducible few-shot adaptation of pretrained age estimators in JAX/Flax.

Layout:
  models/       Flax architectures (VGG-16, MobileNetV2, EfficientNet), heads, prior directories.
  porting/      converters from public checkpoints (torchvision, Keras, Caffe, VGG-Face port).
  data/         dataset readers, cleaning, duplicates, label distributions, image cache, pipelines.
  engine/       the trial engine: per-trial state, Caffe SGD, vmapped/looped steps, evaluation.
  experiments/  the studies (learning curve, imposed distributions, transfer).
  reports/      result tables, plots, TensorBoard logging.
"""

__version__ = "0.1.0"
