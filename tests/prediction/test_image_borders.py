"""Image borders in tiled prediction (issue 21, item 8): false objects along an image's top border.

What was measured (Fluo-C2DL-Huh7, a time-lapse of sparse cells on a dark background, the built-in small SAM
fine-tuned on its one annotated frame): a fine-tuned model predicts the outer rows and columns of a tile with
less context and leans to foreground there (2 to 4 times the foreground probability of the tile's inside, on
the same kind of background, at every edge of a tile). Inside an image, overlapping tiles blend those rows away
(a tile's weight falls to about 0 at an edge it shares with a neighbour), but an image's own border was always a
tile's first or last row at full weight: 31 % of the pixels in the top two rows were foreground against 6 % in
rows 10-29 and 0 % for Otsu. The top was worst because this time-lapse's background is brightest there.

Now a plane continues past its border as its mirror image, ``mirror_margin(tile)`` pixels wide, in prediction
(``predict_tiled(border=...)``, which ``prediction.planes`` uses) and in training patches (``data.sampling``).

The tests use models whose only fault is at a tile's edge. A random tiny SAM cannot show a border effect in a
shift test: its prediction depends on a pixel's place in the tile everywhere (a 6 px shift changes its
probabilities by 0.01 to 1.0 far from any border, with or without the margin).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_model

from napari_convlora.config import InputSpec
from napari_convlora.data.sampling import mirror_margin
from napari_convlora.prediction.planes import predict_image
from napari_convlora.prediction.tiling import predict_tiled

TILE = 64


def edge_biased_prob_fn(batch: torch.Tensor, rows: int = 3) -> torch.Tensor:
    """Foreground in the outer ``rows`` rows and columns of every tile, background inside: a model whose only
    fault is at a tile's edge (B x 2 x t x t)."""
    b, _, t, _ = batch.shape
    edge = torch.zeros(t, t)
    edge[:rows], edge[-rows:], edge[:, :rows], edge[:, -rows:] = 1.0, 1.0, 1.0, 1.0
    p1 = edge.expand(b, 1, t, t)
    return torch.cat([1.0 - p1, p1], dim=1)


def contrast_prob_fn(batch: torch.Tensor) -> torch.Tensor:
    """Foreground where a pixel differs from its 7 x 7 neighbourhood, with the zero padding of a convolution at a
    tile's edge: the same answer wherever the same content is, except within 3 px of a tile's edge, where the
    padding looks like a dark object's boundary (as SAM's edge rows do; B x 2 x t x t)."""
    mean = F.avg_pool2d(batch, 7, stride=1, padding=3, count_include_pad=True)
    contrast = (batch - mean).abs().mean(dim=1, keepdim=True)
    p1 = torch.sigmoid((contrast - 12.0) / 3.0)
    return torch.cat([1.0 - p1, p1], dim=1)


@pytest.mark.parametrize("shape", [(150, 170), (TILE, TILE), (40, 90)])
def test_a_model_wrong_at_tile_edges_leaves_no_trace_at_image_borders(shape):
    """Inside an image a tile's edge rows are blended away; at the image's border they were kept at full weight
    (every border pixel foreground here). With the mirror border no image pixel is predicted from them."""
    image = np.random.default_rng(0).uniform(0, 255, shape + (3,)).astype(np.float32)
    before = predict_tiled(edge_biased_prob_fn, image, TILE, 2, border=0)[1]
    assert (before[0] > 0.5).all() and (before[:, 0] > 0.5).all()  # the defect: top and left borders
    after = predict_tiled(edge_biased_prob_fn, image, TILE, 2, border=mirror_margin(TILE))[1]
    assert after.max() < 0.5, "a tile's edge rows decided some image pixels"
    assert (before[3:-3, 3:-3] < 0.5).all()  # inside the image, the blending already hid them


def _scene(height: int, width: int) -> np.ndarray:
    """Sparse bright cells on an even dark background, none within 20 px of a border (uint8)."""
    rng = np.random.default_rng(1)
    image = np.full((height, width), 40, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(10):
        cy, cx, r = rng.uniform(30, height - 30), rng.uniform(30, width - 30), rng.uniform(4, 9)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 200
    image[height // 2, width // 2], image[height // 2 + 1, width // 2] = 0, 255  # a fixed intensity range
    return image


SHIFT = 5
SIDES = {  # the scene cut so that its row/column SHIFT becomes a border; where that border is in the cut scene
    "top": (np.s_[SHIFT:, :], np.s_[:2, :]),
    "bottom": (np.s_[:-SHIFT, :], np.s_[-2:, :]),
    "left": (np.s_[:, SHIFT:], np.s_[:, :2]),
    "right": (np.s_[:, :-SHIFT], np.s_[:, -2:]),
}


@pytest.mark.parametrize("side", list(SIDES))
def test_prediction_of_content_does_not_depend_on_touching_a_border(tiny_checkpoint, side):
    """The same content predicted where it touches an image border (the scene cut by 5 px) and where it does not
    (the whole scene) must get the same probabilities, all over the content. A model whose only fault is the
    zero padding at a tile's edge (``contrast_prob_fn``) moved the border rows' probabilities by up to 0.83
    and here, with the mirror border, the differences are those of the blending at interior tile edges."""
    model = make_model(tiny_checkpoint, num_classes=2, input_size=TILE, input=InputSpec(percentiles=(0.0, 100.0)))
    model.class_probabilities = contrast_prob_fn  # the plugin's path: SamPlanes, mirror border, tiles, blending
    scene = _scene(150, 170)
    whole = predict_image(model, scene, device="cpu", return_probabilities=True).probabilities[1]
    cut, border_rows = SIDES[side]
    touching = predict_image(model, np.ascontiguousarray(scene[cut]), device="cpu",
                             return_probabilities=True).probabilities[1]
    difference = np.abs(touching - whole[cut])
    assert difference[border_rows].max() < 0.02, f"the {side} border rows depend on the border"
    assert difference.max() < 0.08
    assert whole.max() > 0.9  # the cells' edges are found: the comparison is not between two blank maps


def test_mirror_border_streams_and_crops_like_the_whole_image():
    """With a border, bands handed to ``sink`` start at the image's row 0 and hold the image's pixels only."""
    image = np.random.default_rng(2).uniform(0, 255, (150, 120, 3)).astype(np.float32)
    whole = predict_tiled(contrast_prob_fn, image, TILE, 2, border=8, batch_size=3)
    assert whole.shape == (2, 150, 120)
    bands = []
    predict_tiled(contrast_prob_fn, image, TILE, 2, border=8, batch_size=3,
                  sink=lambda first, band: bands.append((first, band.copy())))
    assert bands[0][0] == 0 and all(b.shape[2] == 120 for _, b in bands)
    assert np.array_equal(np.concatenate([b for _, b in bands], axis=1), whole)
    extended = np.pad(image, ((8, 8), (8, 8), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(whole, predict_tiled(contrast_prob_fn, extended, TILE, 2)[:, 8:-8, 8:-8])
    with pytest.raises(ValueError, match="border"):
        predict_tiled(contrast_prob_fn, image, TILE, 2, border=-1)
