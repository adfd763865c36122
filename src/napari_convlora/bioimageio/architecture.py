"""The architecture of a BioImage Model Zoo package exported by napari-convlora (``bioimageio/export.py``).

This file is copied as it is into every package (``weights.pytorch_state_dict.architecture``) and imported from
there by bioimageio.core or any other consumer, so it imports napari-convlora only by absolute names. The
package's ``weights.pt`` is the state dict of :class:`AdaptedSamSegmenter`: base SAM, adapters and head.

Division of work with the package's description (``rdf.yaml``):

- **preprocessing** (in the description, so that a consumer computes it over the whole image even when it
  predicts in blocks): per channel, the model's low and high intensity percentiles -> 0 and 1 (``scale_range``),
  then clipped to 0..1;
- **forward** (here): the channels into SAM's RGB slots (as ``data.SamPlanes`` does), times 255, the model's
  ``rescale``, overlapping blended tiles of the model's input size (``prediction.tiling.predict_tiled``, as napari-convlora
  predicts), back to the input's size: class probabilities.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from napari_convlora.config import ModelConfig, from_record
from napari_convlora.data import rescale_image, rescale_probabilities, scaled_shape
from napari_convlora.data.images import rgb_slots
from napari_convlora.data.sampling import mirror_margin
from napari_convlora.modeling import AdaptedSAM
from napari_convlora.modeling.sam_build import build_sam
from napari_convlora.prediction.tiling import predict_tiled


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """Float32 matrix products and convolutions without TF32 on CUDA, so that a GPU reproduces the package's
    test output (computed the same way) as closely as a CPU does."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


class AdaptedSamSegmenter(nn.Module):
    """A napari-convlora model as one ``nn.Module``: normalised image in, class probabilities out.

    Args:
        config: the model's :class:`~napari_convlora.config.ModelConfig` as a record (``config.to_record``).
        overlap: minimum fraction of a tile shared by neighbouring tiles (napari-convlora's default 0.25).
        batch_size: tiles per encoder call.

    The SAM is built with random weights; the package's state dict (``model.*``) replaces them all.
    """

    def __init__(self, config: dict[str, Any], overlap: float = 0.25, batch_size: int = 4) -> None:
        super().__init__()
        model_config = from_record(ModelConfig, config, "the bioimageio package", "config")
        self.model = AdaptedSAM(build_sam(model_config.base), model_config)
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: B x C x Y x X float, each channel already mapped to 0..1 by the package's preprocessing
        (C = the model's 1 to 3 input channels) -> B x K x Y x X float32 class probabilities (sum 1 over K)."""
        if image.dim() != 4:
            raise ValueError(f"expected an image B x C x Y x X, got shape {tuple(image.shape)}")
        config = self.model.config
        slots = rgb_slots(image.shape[1], config.input)
        device = self.model.pixel_mean.device

        def prob_fn(batch: torch.Tensor) -> torch.Tensor:  # no autocast: float32 as the test output
            return self.model.class_probabilities(batch.to(device)).float()

        planes = image.detach().float().cpu().numpy()
        out = []
        for plane in planes:
            rgb = np.zeros(plane.shape[1:] + (3,), dtype=np.float32)
            for channel, channel_slots in zip(plane, slots):
                for slot in channel_slots:
                    rgb[..., slot] = channel * np.float32(255.0)
            seen = rescale_image(rgb, scaled_shape(rgb.shape[:2], config.input.rescale))
            with strict_float32():
                probs = predict_tiled(prob_fn, seen, config.input_size, config.head.num_classes,
                                      overlap=self.overlap, batch_size=self.batch_size,
                                      border=mirror_margin(config.input_size))
            out.append(rescale_probabilities(probs, rgb.shape[:2]))
        return torch.from_numpy(np.stack(out)).to(image.device)
