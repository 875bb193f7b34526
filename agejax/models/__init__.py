"""Flax age models: architectures, heads, and prior directories (`load_pretrained`)."""

from agejax.models.heads import DEX_BINS, age_loss, make_head, predict_age
from agejax.models.pretrained import Preprocess, load_pretrained, save_pretrained
from agejax.models.registry import BACKBONES, AgeModel, build_model, register_backbone

__all__ = [
    "BACKBONES", "DEX_BINS", "AgeModel", "Preprocess", "age_loss", "build_model", "load_pretrained",
    "make_head", "predict_age", "register_backbone", "save_pretrained",
]
