"""Interactive prompting with the adapted model: a point clicked in ``"prompt points"`` or a rectangle drawn in
``"prompt boxes"`` becomes an object of ``"<image> instances"``, computed on the compute thread from the cached
embedding of its plane's window. A negative point (``negative points`` ticked) corrects the last object made by a
positive point on its plane. A mixin of the dock widget (with ``WeakActions``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Image

from .._napari import weak_jobs
from .._napari.layers import instances_name
from .._napari.weak_layers import (
    PROMPT_BOXES,
    PROMPT_POINTS,
    add_instance,
    added_indices,
    box_prompt,
    point_prompt,
    prompt_layers,
    set_negative_points,
)
from .compute import JobWorker


class PromptActions:
    """The Interactive prompting toggle and what a new point or rectangle does."""

    def _init_prompting(self) -> None:
        self.prompt_layers: tuple[Any, Any] | None = None  # (points, boxes) listened to while prompting is on
        self.prompt_object: weak_jobs.PromptedObject | None = None  # the last object made by a positive point

    def set_interactive(self, on: bool) -> None:
        """Turn interactive prompting on (adding or reusing the prompt layers over the chosen image) or off."""
        self._stop_listening()
        if not on:
            return
        name = self.weak_form.image.current()
        problem = None
        if self.prompt_model is None:
            problem = "adapt first (Adapt), or load an adapted model under Model, then prompt interactively"
        elif name is None:
            problem = "choose the Image layer to prompt on"
        else:
            try:
                points, boxes = prompt_layers(self.viewer, self.viewer.layers[name])
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            self._untoggle()
            self._refuse(problem)
            return
        self.prompt_layers = (points, boxes)
        points.events.data.connect(self._points_changed)
        boxes.events.data.connect(self._boxes_changed)
        set_negative_points(points, self.weak_form.negative.isChecked())
        boxes.mode = "add_rectangle"
        points.mode = "add"
        self.viewer.layers.selection.active = points
        self.say(f"interactive prompting on '{name}': click in '{PROMPT_POINTS}' or draw a rectangle in "
                 f"'{PROMPT_BOXES}'; objects go to '{instances_name(name)}'")

    def _untoggle(self) -> None:
        self.weak_form.interactive.blockSignals(True)
        self.weak_form.interactive.setChecked(False)
        self.weak_form.interactive.blockSignals(False)

    def _stop_listening(self) -> None:
        if self.prompt_layers is None:
            return
        points, boxes = self.prompt_layers
        points.events.data.disconnect(self._points_changed)
        boxes.events.data.disconnect(self._boxes_changed)
        self.prompt_layers = None

    def _negative_toggled(self, negative: bool) -> None:
        if self.prompt_layers is not None:
            set_negative_points(self.prompt_layers[0], negative)

    def _prompt_image(self) -> Image | None:
        name = self.weak_form.image.current()
        if name is None or name not in self.viewer.layers:
            self._refuse("choose the Image layer to prompt on")
            return None
        return self.viewer.layers[name]

    # ---- a new point or rectangle ------------------------------------------------------------------------
    def _points_changed(self, event: Any) -> None:
        points = self.prompt_layers[0] if self.prompt_layers else None
        for index in added_indices(points, event) if points is not None else []:
            self.prompt_point(index)

    def _boxes_changed(self, event: Any) -> None:
        boxes = self.prompt_layers[1] if self.prompt_layers else None
        for index in added_indices(boxes, event) if boxes is not None else []:
            self.prompt_box(index)

    def prompt_point(self, index: int) -> JobWorker | None:
        """Point ``index`` of the prompt points: a positive one makes a new object, a negative one corrects the
        last object made by a positive point on its plane."""
        image = self._prompt_image()
        if image is None:
            return None
        try:
            plane, xy, positive = point_prompt(self.prompt_layers[0], index, image)
        except ValueError as e:
            return self._refuse(str(e))
        target = self.prompt_object
        if positive:
            target = self.prompt_object = weak_jobs.PromptedObject(image.name, plane, positive=[xy])
        elif target is None or (target.image_name, target.plane) != (image.name, plane):
            return self._refuse("a negative point corrects the last object made by a positive point on its plane: "
                                "click a positive point on this plane first")
        else:
            target.negative.append(xy)
        return self._prompt(image, target)

    def prompt_box(self, index: int) -> JobWorker | None:
        """Shape ``index`` of the prompt boxes: a new object from its box."""
        image = self._prompt_image()
        if image is None:
            return None
        try:
            plane, box = box_prompt(self.prompt_layers[1], index, image)
        except ValueError as e:
            return self._refuse(str(e))
        return self._prompt(image, weak_jobs.PromptedObject(image.name, plane, box=box))

    def _prompt(self, image: Image, target: weak_jobs.PromptedObject) -> JobWorker | None:
        if self.prompt_model is None:
            return self._refuse("adapt first (Adapt), or load an adapted model under Model")
        if self.busy_with is not None:
            return self._refuse(f"wait until the running job ends ({self.busy_with}), or Stop it, then prompt again")
        cached, key, copy = self._cache_for(image)
        points = [np.reshape(p, (-1, 2)).astype(np.float32) for p in (target.positive, target.negative)]
        return self._run(weak_jobs.prompt_job, self.prompt_model, cached, key, copy, target, target.box, *points,
                         self.model_form.device_name(), on_returned=self._prompted)

    def _prompted(self, result: weak_jobs.PromptResult) -> None:
        self.prompt_cache = result.cache
        target = result.target
        if target.image_name not in self.viewer.layers:
            return
        if not result.mask.any():
            self.say(f"the prompt on plane {target.plane} of '{target.image_name}' gave no object")
            return
        new = target.object_id is None
        target.object_id = add_instance(self.viewer, self.viewer.layers[target.image_name], target.plane,
                                        result.mask, target.object_id)
        self.say(f"{'added' if new else 'corrected'} object {target.object_id} of "
                 f"'{instances_name(target.image_name)}' on plane {target.plane} ({int(result.mask.sum()):,} px)")
