"""Uncertainty and suggestions of where to label (issue 25): entropy at its extremes, suggestions where the model
hesitates, spread out, never on labelled pixels, none where it is sure."""

from __future__ import annotations

import numpy as np
import pytest

from napari_convlora.prediction.uncertainty import suggest_regions, uncertainty_map


def test_uncertainty_is_zero_where_one_class_is_certain_and_one_where_all_are_equally_likely():
    probabilities = np.zeros((3, 2, 2), np.float32)
    probabilities[0, 0, 0] = 1.0
    probabilities[:, 0, 1] = 1 / 3
    probabilities[:, 1, 0] = (0.5, 0.5, 0.0)
    probabilities[:, 1, 1] = (0.9, 0.05, 0.05)
    u = uncertainty_map(probabilities)
    assert u.dtype == np.float32 and u.shape == (2, 2)
    assert u[0, 0] == pytest.approx(0.0, abs=1e-6) and u[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert u[1, 0] == pytest.approx(np.log(2) / np.log(3), rel=1e-5)
    assert 0 < u[1, 1] < u[1, 0]
    with pytest.raises(ValueError, match="K >= 2"):
        uncertainty_map(np.ones((1, 4, 4)))


def test_suggestions_point_at_the_most_uncertain_regions_first_and_stay_apart():
    u = np.zeros((200, 200), np.float32)
    u[10:42, 140:172] = 0.9  # the most uncertain window
    u[100:130, 40:70] = 0.6
    u[102:110, 60:68] = 0.62  # inside the second region: too close to be a third suggestion
    u[180:195, 5:20] = 0.3
    centres = suggest_regions(u, window=32)
    assert len(centres) == 3
    assert 10 <= centres[0][0] < 42 and 140 <= centres[0][1] < 172
    assert 95 <= centres[1][0] < 135 and 35 <= centres[1][1] < 75
    assert centres[2][0] > 170
    gaps = [np.abs(a - b).max() for i, a in enumerate(centres) for b in centres[i + 1:]]
    assert min(gaps) >= 32


def test_suggestions_leave_labelled_pixels_out_and_a_sure_model_gets_none():
    u = np.zeros((128, 128), np.float32)
    u[10:40, 10:40] = 1.0
    u[80:110, 80:110] = 0.5
    labelled = np.zeros(u.shape, bool)
    labelled[0:60, 0:60] = True  # the user already painted the most uncertain place
    centres = suggest_regions(u, labelled, window=16)
    assert len(centres) >= 1 and all(not labelled[int(y), int(x)] for y, x in centres)
    assert 80 <= centres[0][0] < 110 and 80 <= centres[0][1] < 110
    assert suggest_regions(np.full((64, 64), 0.01, np.float32)).shape == (0, 2)
    with pytest.raises(ValueError, match="labelled pixels have shape"):
        suggest_regions(u, labelled[:10])
