"""Kept for BioImage Model Zoo packages exported before napari-convlora 0.3: their ``bioimageio_model.py`` imports
``predict_tiled`` from here. Tiled prediction lives in :mod:`napari_convlora.prediction.tiling`."""

from .prediction.tiling import predict_tiled

__all__ = ["predict_tiled"]
