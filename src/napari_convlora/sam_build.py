"""Kept for BioImage Model Zoo packages exported before napari-convlora 0.3: their ``bioimageio_model.py`` imports
``build_sam`` from here. The builder lives in :mod:`napari_convlora.modeling.sam_build`."""

from .modeling.sam_build import build_sam, infer_architecture

__all__ = ["build_sam", "infer_architecture"]
