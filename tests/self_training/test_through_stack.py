"""Prompts carried through a stack (issue 23, item 4): a box on one plane segments the object there and on the
planes around it until it ends, with one id through the stack; a prompt on another plane takes over; what cannot
work is refused in one line. The built-in SAM segments the bright balls of ``helpers.ball_stack`` from a box."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from helpers import ball_stack, make_model

from napari_convlora import save_adapter
from napari_convlora.checkpoints.builtin import builtin_checkpoint
from napari_convlora.data import ImageLayout
from napari_convlora.self_training.prompting import EmbeddingCache
from napari_convlora.self_training.through_stack import mask_prompt, segment_through_stack
from napari_convlora.weak import WeakLabels, WeakObject

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Boxes (x0, y0, x1, y1) of the two balls on their middle planes.
FIRST_BOX = np.array([40, 50, 101, 111], np.float32)
SECOND_BOX = np.array([125, 45, 176, 96], np.float32)


@pytest.fixture(scope="module")
def model():
    return make_model(builtin_checkpoint(), input_size=256).eval()


def _iou(a, b):
    return np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1)


def test_a_box_on_one_plane_segments_the_object_through_the_stack_until_it_ends(model):
    image, truth = ball_stack()
    weak = WeakLabels(truth.shape, {(7,): [WeakObject((7,), "box", box=FIRST_BOX)],
                                    (4,): [WeakObject((4,), "box", box=SECOND_BOX)]})
    labels, objects, spans = segment_through_stack(EmbeddingCache(model, image, ImageLayout()), weak)
    assert len(objects) == 2 and set(np.unique(labels)) == {0, 1, 2}
    for k, obj in enumerate(objects, 1):
        ball = truth == (1 if obj.plane == (7,) else 2)
        present = [z for z in range(15) if np.count_nonzero(ball[z]) > 800]  # the planes where it is not a cap
        assert all(_iou(labels[z] == k, ball[z]) > 0.8 for z in present), k  # one id through the stack
        ends = [z for z in range(15) if not ball[z].any()]
        assert not any((labels[z] == k).any() for z in ends)  # it stops where the object ends
        span = spans[k - 1]
        assert span.first <= min(present) and span.last >= max(present) and span.prompted == obj.plane
    without = segment_through_stack(EmbeddingCache(model, image, ImageLayout()), weak, planes=[(4,)])[0]
    assert set(np.unique(without)) == {0, 1}  # only the prompts of the planes asked for


def test_a_prompt_on_another_plane_takes_the_object_over(model):
    image, truth = ball_stack()
    weak = WeakLabels(truth.shape, {(5,): [WeakObject((5,), "box", box=FIRST_BOX + [5, 5, -5, -5])],
                                    (9,): [WeakObject((9,), "box", box=FIRST_BOX + [5, 5, -5, -5])]})
    labels, objects, spans = segment_through_stack(EmbeddingCache(model, image, ImageLayout()), weak)
    lower, upper = (1, 2) if objects[0].plane == (5,) else (2, 1)
    assert (labels[9] == upper).any() and not (labels[9] == lower).any()  # the prompt of plane 9 keeps its plane
    assert (labels[5] == lower).any() and not (labels[5] == upper).any()
    assert spans[lower - 1].last < 9 and spans[upper - 1].first > 5


def test_the_next_prompt_is_the_masks_box_and_innermost_point():
    mask = np.zeros((40, 50), bool)
    mask[10:21, 5:30] = True  # 11 rows x 25 columns
    prompt = mask_prompt(mask, top=2, left=4)
    np.testing.assert_array_equal(prompt.box, [1, 8, 26, 19])  # pixel edges, in the window at (2, 4)
    (x, y), = prompt.positive
    assert (x + 4, y + 2) == (17.5, 15.5) and prompt.kind == "box"  # the centre pixel, farthest from the background


def test_a_single_plane_and_a_bad_threshold_are_refused(model):
    image, truth = ball_stack()
    weak = WeakLabels(truth.shape[1:], {(): [WeakObject((), "box", box=FIRST_BOX)]})
    with pytest.raises(ValueError, match="single plane"):
        segment_through_stack(EmbeddingCache(model, image[7], ImageLayout()), weak)
    stack = WeakLabels(truth.shape, {(7,): [WeakObject((7,), "box", box=FIRST_BOX)]})
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        segment_through_stack(EmbeddingCache(model, image, ImageLayout()), stack, iou_threshold=0)


def test_segment_prompts_through_stack_on_the_command_line(model, tmp_path, capsys):
    from napari_convlora.cli import main

    image, truth = ball_stack()
    tifffile.imwrite(tmp_path / "stack.tif", image)
    boxes = tmp_path / "boxes.csv"
    x0, y0, x1, y1 = FIRST_BOX
    rows = [(0, "rectangle", i, 7, y, x) for i, (y, x) in enumerate([(y0, x0), (y0, x1), (y1, x1), (y1, x0)])]
    boxes.write_text("index,shape-type,vertex-index,axis-0,axis-1,axis-2\n"
                     + "".join(",".join(map(str, r)) + "\n" for r in rows))
    adapter = save_adapter(model, tmp_path / "m.safetensors")
    common = ["segment-prompts", "--model", str(adapter), "--checkpoint", "builtin", "--boxes", str(boxes),
              "--device", "cpu", "--threads", "1"]
    assert main([*common, "--image", str(tmp_path / "stack.tif"), "--out", str(tmp_path / "out.tif"),
                 "--through-stack"]) == 0
    out = tifffile.imread(tmp_path / "out.tif")
    assert out.shape == truth.shape and _iou(out[3] == 1, truth[3] == 1) > 0.8  # four planes from the box
    captured = capsys.readouterr()
    assert "1 objects carried through the stack" in captured.out and "planes 1-13" in captured.err
    tifffile.imwrite(tmp_path / "plane.tif", image[7])
    flat = tmp_path / "flat.csv"
    flat.write_text("index,shape-type,vertex-index,axis-0,axis-1\n"
                    + "".join(f"0,rectangle,{i},{y},{x}\n" for i, (_, _, _, _, y, x) in enumerate(rows)))
    assert main([*common[:5], "--boxes", str(flat), "--device", "cpu", "--image", str(tmp_path / "plane.tif"),
                 "--out", str(tmp_path / "no.tif"), "--through-stack", "--checkpoint", "builtin"]) != 0
    assert "--through-stack" in capsys.readouterr().err and not (tmp_path / "no.tif").exists()
