"""Synthetic scenes for pretraining a small SAM with its promptable objective, and shifted scenes for a
domain-shift benchmark (numpy, scipy and scikit-image only; no torch, no downloads)."""

from .preview import contact_sheet
from .synthetic import (HELD_OUT_TEXTURE, MIN_AREA, SHIFTS, TRAIN_TEXTURES, Scene, class_labels, random_scene,
                        shifted_scene)

__all__ = ["HELD_OUT_TEXTURE", "MIN_AREA", "SHIFTS", "TRAIN_TEXTURES", "Scene", "class_labels", "contact_sheet",
           "random_scene", "shifted_scene"]
