"""The Weak labels tab (issue 13) under Xvfb, on the tiny SAM: weak labels in (Shapes boxes, Points), Adapt with live
progress and Stop, Segment prompts (and the unadapted comparison), interactive prompting from cached embeddings, the
bridge to training labels, and bad input refused with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.measure import label

from dock_fixtures import _wait_idle
from helpers import ball_stack, make_model
from napari_convlora.data.samples import CLASS_NAMES

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("isolated_settings")]


def _rect(mask):
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    return np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], float)


def _inside(mask):
    """A pixel of the object (its middle one in scan order: rods are not convex)."""
    pixels = np.argwhere(mask)
    return pixels[len(pixels) // 2].astype(float)


def _weak_layers(viewer):
    """Boxes of the first four objects and points on the others (one negative point), each with its class."""
    classes = np.asarray(viewer.layers["cells labels"].data)
    instances = label(classes > 0)
    ids = list(range(1, instances.max() + 1))
    name = [CLASS_NAMES[int(np.bincount(classes[instances == i]).argmax())] for i in ids]
    viewer.add_shapes([_rect(instances == i) for i in ids[:4]], shape_type="rectangle", name="boxes",
                      features={"class": name[:4]})
    points = [_inside(instances == i) for i in ids[4:]] + [np.array([1.0, 1.0])]
    viewer.add_points(np.array(points), name="points",
                      features={"label": [True] * (len(ids) - 4) + [False], "class": name[4:] + [None]})
    viewer.add_labels(instances, name="truth")
    return instances, name


def _choose(dock, layers, image="cells", evaluation=None):
    form = dock.weak_form
    form.refresh()
    form.image.refresh(image)
    form.set_checked(layers)
    form.evaluation.refresh(evaluation or form.evaluation.empty)
    assert form.checked_layers() == [n for n in [layer.name for layer in dock.viewer.layers] if n in layers]


@pytest.fixture
def refusals(monkeypatch):
    told = []
    monkeypatch.setattr("napari_convlora._qt.widget.show_info", lambda m: told.append(m))
    return told


def _promptable(dock, tiny_checkpoint, tmp_path):
    model = make_model(tiny_checkpoint, method="lora", input_size=128, rank=4, alpha=4.0, qkv_slices=("q", "v"))
    dock.set_prompt_model(model.eval(), str(tmp_path / "adapted.safetensors"))
    return model


def test_weak_labels_adapt_segment_compare_and_become_training_labels(dock, viewer, qtbot, tmp_path, refusals):
    instances, names = _weak_layers(viewer)
    assert dock.setup.tabText(dock.setup.indexOf(dock.weak_form)) == "Weak labels"
    assert dock.weak_form.evaluation.current() is None  # optional: never chosen by default
    _choose(dock, ["boxes", "points"], evaluation="truth")
    dock.weak_form.steps.setValue(3)
    assert not dock.weak_form.segment.isEnabled() and not dock.weak_form.interactive.isEnabled()
    assert dock.adapt() is not None
    assert dock.weak_form.stop.isEnabled() and dock.stop_button.isEnabled() and not dock.weak_form.adapt.isEnabled()
    _wait_idle(dock, qtbot)
    log = dock.log.toPlainText()
    assert dock.events_seen[0] == "start" and dock.events_seen.count("step") == 3 and dock.events_seen[-1] == "finished"
    assert "'cells': 7 weak object(s) on 1 plane(s): 4 box, 3 points" in log
    assert dock.weak_form.read.text().startswith("7 weak object(s)")
    assert "prompt mIoU" in log and "focal" in log and "contrastive" in log  # prompt mIoU and the five loss terms
    assert len(dock.plot.miou_points[0]) >= 2 and dock.progress.value() == 3
    run = Path(dock.prompt_model_path)
    assert run.parent == tmp_path / "runs" and run.is_file() and dock.prompt_model is not None
    assert dock.prompt_model.config.promptable.weak_labels == ("box", "points")
    assert "prompt mIoU" in dock.weak_form.model_info.text() and dock.weak_form.segment.isEnabled()
    assert dock.model is None  # the prompt-free model is not replaced

    dock.weak_form.compare.setChecked(True)
    assert dock.segment_prompts() is not None
    _wait_idle(dock, qtbot)
    adapted, unadapted = viewer.layers["cells instances"], viewer.layers["cells instances (unadapted)"]
    assert adapted.data.shape == instances.shape and unadapted.data.shape == instances.shape
    assert set(np.unique(adapted.data)) <= set(range(8)) and len(np.unique(adapted.data)) > 1
    classes = adapted.metadata["napari_convlora"]["classes"]
    assert classes == {k: n for k, n in enumerate(names, start=1)}  # the class feature of each box and point
    assert "wrote 'cells instances' and 'cells instances (unadapted)': 7 object(s)" in dock.log.toPlainText()

    layer = dock.instances_to_training_labels()
    assert layer.name == "cells classes" and "cells classes" in viewer.layers
    assert list(layer.features["class"]) == ["background"] + sorted(set(names))
    values = {n: v for v, n in zip(layer.features["index"], layer.features["class"])}
    ids = np.asarray(adapted.data)
    for k, n in enumerate(names, start=1):
        assert (np.asarray(layer.data)[ids == k] == values[n]).all()
    assert ("cells", "cells classes") in dock.data_form.pairs()
    from napari_convlora._napari.layers import feature_class_names

    assert feature_class_names(layer) == {0: "background", **{v: n for n, v in values.items() if v}}

    dock.load_finetuned(str(run))  # an adapted file chosen under Model answers prompts too
    _wait_idle(dock, qtbot)
    assert dock.prompt_model is not None and dock.prompt_model_path == str(run) and dock.prompt_cache is None
    assert not any("\n" in m for m in refusals)


def test_interactive_points_and_boxes_add_objects_from_cached_embeddings(dock, viewer, qtbot, tiny_checkpoint,
                                                                         tmp_path, refusals):
    dock.weak_form.refresh()
    dock.weak_form.image.refresh("cells")
    dock.weak_form.interactive.setChecked(True)  # no model yet: refused, and the toggle goes back
    assert not dock.weak_form.interactive.isChecked() and "adapt first" in refusals[-1]
    model = _promptable(dock, tiny_checkpoint, tmp_path)
    calls = []
    encode = model.encode
    model.encode = lambda x: calls.append(1) or encode(x)
    dock.weak_form.interactive.setChecked(True)
    points, boxes = viewer.layers["prompt points"], viewer.layers["prompt boxes"]
    assert points.mode == "add" and boxes.mode == "add_rectangle"

    points.add([40.0, 40.0])  # a positive click
    _wait_idle(dock, qtbot)
    layer = viewer.layers["cells instances"]
    assert set(np.unique(layer.data)) == {0, 1} and len(calls) == 1
    first = np.asarray(layer.data) == 1
    dock.weak_form.negative.setChecked(True)
    points.add([45.0, 45.0])  # a negative click corrects object 1 from the same window's cached embedding
    _wait_idle(dock, qtbot)
    assert list(points.features["label"]) == [True, False]
    assert "corrected object 1" in dock.log.toPlainText() and len(calls) == 1
    assert set(np.unique(layer.data)) <= {0, 1} and not np.array_equal(np.asarray(layer.data) == 1, first)
    dock.weak_form.negative.setChecked(False)

    boxes.add_rectangles(np.array([[100, 100], [100, 140], [140, 140], [140, 100]], float))
    _wait_idle(dock, qtbot)
    assert 2 in np.unique(layer.data) and "added object 2" in dock.log.toPlainText()

    points.add([-20.0, 30.0])  # outside the image: one line, nothing computed
    boxes.add_rectangles(np.array([[300, 300], [300, 320], [320, 320], [320, 300]], float))
    assert not dock.workers
    assert "is outside 'cells'" in refusals[-2] and "wholly outside the image" in refusals[-1]
    assert all("\n" not in m for m in refusals)

    layer = dock.instances_to_training_labels()  # no class feature: every object one class
    assert list(layer.features["class"]) == ["background", "object"] and set(np.unique(layer.data)) == {0, 1}

    dock.weak_form.interactive.setChecked(False)  # off: new prompts do nothing
    points.add([60.0, 60.0])
    assert not dock.workers


def test_a_stack_segments_the_plane_shown_and_refuses_prompts_on_other_planes(dock, viewer, qtbot, tiny_checkpoint,
                                                                              tmp_path, refusals):
    image = np.asarray(viewer.layers["cells"].data)
    viewer.add_image(np.stack([image, image[::-1]]), name="stack")
    rect = np.array([[20, 20], [20, 60], [60, 60], [60, 20]], float)
    viewer.add_shapes([np.c_[np.full(4, z), rect] for z in (0, 1)], shape_type="rectangle", name="stack boxes")
    viewer.add_shapes([np.c_[np.full(4, 5), rect]], shape_type="rectangle", name="plane 5")
    _promptable(dock, tiny_checkpoint, tmp_path)
    _choose(dock, ["plane 5"], image="stack")
    assert dock.segment_prompts() is None and "no shape lies on the image" in refusals[-1]
    assert "on plane (5,)" in refusals[-1]

    _choose(dock, ["stack boxes"], image="stack")
    viewer.dims.set_point(0, 1)
    assert dock.segment_prompts() is not None
    _wait_idle(dock, qtbot)
    layer = viewer.layers["stack instances"]
    assert layer.data.shape == (2, 160, 160) and not layer.data[0].any() and layer.data[1].any()

    dock.weak_form.whole_stack.setChecked(True)
    dock.segment_prompts()
    _wait_idle(dock, qtbot)
    assert layer.data[0].any() and len(np.unique(layer.data)) == 3  # one id per box, across the stack

    dock.weak_form.image.refresh("stack")
    dock.weak_form.interactive.setChecked(True)
    viewer.layers["prompt points"].add([7.0, 30.0, 30.0])  # a plane the stack does not have
    assert not dock.workers and "is outside 'stack'" in refusals[-1]


def test_through_stack_carries_a_box_to_the_planes_around_it_and_keeps_what_they_held(dock, viewer, qtbot,
                                                                                       tmp_path, refusals):
    from napari_convlora.checkpoints.builtin import builtin_checkpoint

    image, truth = ball_stack()
    viewer.add_image(image, name="balls")
    viewer.add_shapes([np.c_[np.full(4, 7), [[50, 40], [50, 101], [111, 101], [111, 40]]]], shape_type="rectangle",
                      name="ball box")
    dock.set_prompt_model(make_model(builtin_checkpoint(), input_size=256).eval(), str(tmp_path / "a.safetensors"))
    instances = np.zeros(truth.shape, np.int32)
    instances[3, 140:150, 180:190] = 5  # an object the user made earlier on another plane
    viewer.add_labels(instances, name="balls instances")
    _choose(dock, ["ball box"], image="balls")
    viewer.dims.set_point(0, 7)
    dock.weak_form.through_stack.setChecked(True)
    assert dock.segment_prompts() is not None
    _wait_idle(dock, qtbot)
    data = viewer.layers["balls instances"].data
    new = [i for i in np.unique(data[7]) if i not in (0, 5)]
    assert len(new) == 1  # the box's object, with one id through the stack:
    for z in range(2, 13):
        ball = truth[z] == 1
        assert np.count_nonzero((data[z] == new[0]) & ball) > 0.8 * np.count_nonzero(ball), z
    assert (data[3, 140:150, 180:190] == 5).all()  # the other plane keeps what it held
    assert not (data[14] == new[0]).any()  # past the object's end
    assert dock.segment_prompts() is not None  # again: the object is replaced on every plane, not doubled
    _wait_idle(dock, qtbot)
    data = viewer.layers["balls instances"].data
    again = [i for i in np.unique(data[7]) if i not in (0, 5)]
    assert len(again) == 1 and set(np.unique(data[2:13])) - {0, 5} == {again[0]}  # the old id is gone everywhere
    assert (data[3, 140:150, 180:190] == 5).all()

    viewer.add_image(image[7], name="one plane")
    viewer.add_shapes([[[50, 40], [50, 101], [111, 101], [111, 40]]], shape_type="rectangle", name="flat box")
    _choose(dock, ["flat box"], image="one plane")
    assert dock.segment_prompts() is None and "single plane: untick through stack" in refusals[-1]


@pytest.mark.parametrize("case, message", [
    ("nothing ticked", "choose at least one weak-label layer"),
    ("empty shapes", "Shapes layer 'empty' is empty"),
    ("no positive point", "Points layer 'negatives' has no positive point"),
    ("other dimensions", "has 3 coordinate axes but the image has 2"),
    ("outside", "no shape lies on the image"),
    ("empty labels", "has no labelled pixel"),
    ("evaluation shape", "evaluation Labels layer 'small' has shape (8, 8)"),
])
def test_bad_weak_input_is_refused_with_one_line(dock, viewer, case, message, refusals):
    layers = {
        "nothing ticked": [],
        "empty shapes": [viewer.add_shapes(name="empty")],
        "no positive point": [viewer.add_points([[10, 10], [20, 20]], name="negatives",
                                                features={"label": [False, False]})],
        "other dimensions": [viewer.add_shapes([np.array([[0, 1, 1], [0, 1, 9], [0, 9, 9], [0, 9, 1]], float)],
                                               shape_type="rectangle", name="3d")],
        "outside": [viewer.add_shapes([np.array([[200, 200], [200, 220], [220, 220], [220, 200]], float)],
                                      shape_type="rectangle", name="far")],
        "empty labels": [viewer.add_labels(np.zeros((160, 160), np.uint8), name="blank")],
        "evaluation shape": [viewer.add_points([[10, 10]], name="ok")],
    }[case]
    evaluation = None
    if case == "evaluation shape":
        evaluation = viewer.add_labels(np.zeros((8, 8), np.uint8), name="small").name
    _choose(dock, [layer.name for layer in layers], evaluation=evaluation)
    assert dock.adapt() is None
    assert not dock.workers and message in refusals[-1] and "\n" not in refusals[-1]
    assert message in dock.log.toPlainText()


def test_segment_prompts_without_a_model_and_training_labels_without_instances_are_refused(dock, viewer, refusals):
    _weak_layers(viewer)
    _choose(dock, ["boxes"])
    assert dock.segment_prompts() is None and "adapt first" in refusals[-1]
    assert dock.instances_to_training_labels() is None and "Segment prompts or prompt interactively" in refusals[-1]


def test_stop_ends_adaptation_and_keeps_what_was_trained(dock, viewer, qtbot):
    _weak_layers(viewer)
    _choose(dock, ["boxes"])
    dock.weak_form.steps.setValue(400)
    dock.adapt()
    qtbot.waitUntil(lambda: "step" in dock.events_seen, timeout=60_000)
    dock.weak_form.stop.click()
    _wait_idle(dock, qtbot)
    assert dock.events_seen[-1] == "stopped" and dock.progress.value() < 400
    assert dock.prompt_model is not None and Path(dock.prompt_model_path).is_file()
    assert "stopped: the adapted model" in dock.log.toPlainText()
    assert dock.weak_form.adapt.isEnabled() and not dock.weak_form.stop.isEnabled()


def test_resume_continues_the_stopped_adaptation_in_its_own_file(dock, viewer, qtbot):
    from napari_convlora import load_model

    _weak_layers(viewer)
    _choose(dock, ["boxes"])
    assert not dock.weak_form.resume.isEnabled()  # nothing to resume yet
    dock.weak_form.steps.setValue(12)
    dock.adapt()
    qtbot.waitUntil(lambda: "step" in dock.events_seen, timeout=60_000)
    dock.weak_form.stop.click()
    _wait_idle(dock, qtbot)
    stopped_at = dock.progress.value()
    path = dock.prompt_model_path
    assert dock.events_seen[-1] == "stopped" and stopped_at < 12 and dock.weak_form.resume.isEnabled()
    dock.weak_form.resume.click()
    _wait_idle(dock, qtbot)
    assert dock.events_seen[-1] == "finished" and dock.prompt_model_path == path
    assert "resuming" in dock.log.toPlainText()
    base = dock.model_form.sam.path()
    assert load_model(path, base=base).config.promptable.steps == 12
