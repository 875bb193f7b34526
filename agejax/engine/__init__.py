"""The trial engine: per-trial state, Caffe SGD, vmapped/mapped/looped steps, evaluation, metrics."""
