"""The instance head: foreground, centre and depth maps at full resolution, for touching objects
(``config/instances.py`` says what the maps are; ``instances/`` makes their targets and the objects).

Like micro-sam's instance decoder it reads the adapted encoder and predicts the three maps at the input's own
resolution (``full_resolution.FullResolutionMaps``: the token grid of 16 px cannot place a seam between two
touching nuclei by itself).
"""

from __future__ import annotations

from .full_resolution import STEM_CHANNELS, FullResolutionMaps

__all__ = ["STEM_CHANNELS", "InstanceHead"]


class InstanceHead(FullResolutionMaps):
    """Maps an image's features to three logit maps B x 3 x S x S (foreground, centre, depth) at the input's
    resolution (``forward(features, normalised)``, as :class:`FullResolutionMaps`).

    Args:
        embed_dim: D, the channels of the neck's embedding (SAM's decoder width).
        vit_dim: C, the encoder's width (the early feature's channels).
    """

    def __init__(self, embed_dim: int, vit_dim: int) -> None:
        super().__init__(embed_dim, vit_dim, out_channels=3)
