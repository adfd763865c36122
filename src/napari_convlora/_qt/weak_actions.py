"""What the dock's Weak labels tab does: Adapt (WeSAM self-training from the weak-label layers), Segment prompts
(every prompt one instance, optionally with the unadapted SAM beside it) and Instances to training labels (the
bridge to the prompt-free head). A mixin of the dock widget, which provides ``viewer``, ``model_form``,
``data_form``, ``view`` and the job runner (``_run``, ``_set_busy``, ``say``, ``_refuse``, ``_names``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari.layers import Image, Labels, Points, Shapes

from .._napari import jobs, weak_jobs
from .._napari.layers import copy_image, current_plane, instances_name
from .._napari.weak_layers import (WeakInput, plane_tuple, read_weak_input, unadapted_name, write_class_labels,
                                   write_prompted_instances)
from ..io.safety import new_run_path
from ..weak import WeakLabelError, WeakLabels
from ..weak.classes import object_class
from .advanced_options import DEFAULT_RUN_FOLDER
from .compute import JobWorker
from .weak_form import WeakForm


class WeakActions:
    """Adapt, Segment prompts and Instances to training labels; the promptable model and its embedding cache."""

    def _init_weak(self) -> None:
        self.prompt_model: Any = None  # the adapted (promptable) model; lives on the compute thread
        self.prompt_model_path: str | None = None
        self.prompt_cache: tuple[Any, Any] | None = None  # (key, EmbeddingCache) of the image prompted last
        self.busy_with: str | None = None
        self.last_step: Any = None  # the last self-training step event (its loss terms are logged at saves)
        self.weak_run: str | None = None  # the last self-training run's file (Resume continues it)
        self.weak_form = WeakForm(self._names(Image), self._weak_layer_names, self._names(Labels))
        self.weak_form.refresh()
        self._init_prompting()

    def _connect_weak(self) -> None:
        form = self.weak_form
        form.adapt.clicked.connect(lambda: self.adapt())
        form.stop.clicked.connect(self.stop)
        form.resume.clicked.connect(lambda: self.adapt(resume=True))
        form.segment.clicked.connect(lambda: self.segment_prompts())
        form.to_training.clicked.connect(lambda: self.instances_to_training_labels())
        form.interactive.toggled.connect(self.set_interactive)
        form.negative.toggled.connect(self._negative_toggled)

    def _weak_layer_names(self) -> list[tuple[str, str]]:
        return [(layer.name, type(layer).__name__) for layer in self.viewer.layers
                if isinstance(layer, (Shapes, Points, Labels))]

    def _set_weak_busy(self, what: str | None) -> None:
        self.busy_with = what
        self.weak_form.set_busy(what, self.prompt_model is not None, self.weak_run is not None)

    # ---- reading the weak labels -------------------------------------------------------------------------
    def _weak_input(self, evaluation: bool = True, copy: bool = True) -> WeakInput:
        """The chosen image's weak labels from the ticked layers (WeakLabelError, one line, when unusable)."""
        form = self.weak_form
        name = form.image.current()
        if name is None:
            raise WeakLabelError("choose the Image layer the weak labels are drawn on")
        layers = [self.viewer.layers[n] for n in form.checked_layers() if n in self.viewer.layers]
        truth = form.evaluation.current() if evaluation else None
        return read_weak_input(self.viewer.layers[name], layers, form.coarse_masks.isChecked(),
                               self.viewer.layers[truth] if truth else None, copy=copy)

    def _show_read(self, image_name: str, weak: WeakLabels) -> None:
        lines = weak.summary().lines()
        for line in lines:
            self.say(f"'{image_name}': {line}")
        skipped = len(weak.skipped)
        self.weak_form.read.setText(lines[0] + (f"; {skipped} skipped (see the log)" if skipped else ""))

    # ---- adapt -------------------------------------------------------------------------------------------
    def adapt(self, resume: bool = False) -> JobWorker | None:
        """Adapt SAM's encoder to the chosen image from its weak labels (WeSAM self-training) on the compute thread;
        ``resume``: continue the last run exactly (its file, its recipe; the weak labels must be read as before)."""
        base = self.model_form.sam.path()
        if not base:
            return self._refuse("choose a SAM checkpoint first (or the built-in model)")
        if self.model_form.sam.error:
            return self._refuse(f"the SAM checkpoint cannot be used: {self.model_form.sam.error}")
        try:
            weak = self._weak_input()
            recipe = self.weak_form.recipe(self.model_form.input_size.value())
            run = self.data_form.options.run_options(self.model_form.device_name(), self.model_form.precision_name())
        except ValueError as e:
            return self._refuse(str(e))
        if resume and self.weak_run is None:
            return self._refuse("nothing to resume: adapt first")
        resume_from = self.weak_run if resume else None
        out_path = resume_from or new_run_path(Path(str(self.data_form.options.run_folder.value or DEFAULT_RUN_FOLDER)))
        self._show_read(weak.image.name, weak.weak)
        self.view.start_training()
        self.last_step = None
        self.say(f"adapting SAM with {self.weak_form.method.currentText()} into {out_path}")
        self._set_busy("adapt")
        return self._run(weak_jobs.adapt_job, base, weak.image, weak.weak, recipe, run, out_path, stoppable=True,
                         on_returned=self._adapted, on_yielded=self._adapt_event, resume_from=resume_from)

    def _adapt_event(self, event: Any) -> None:
        """Self-training events: steps and the run's start and end as training's; prompt mIoU on the mIoU curve;
        the five loss terms in the log at every save."""
        if isinstance(event, jobs.Message):
            self.say(event.text)
        elif event.kind == "validation":
            self.view.events_seen.append("validation")
            self.view.plot.add_miou(event.step, event.metrics.get("prompt_miou"))
            self.say(event.message)
        else:
            if event.kind == "steps":
                self.last_step = event.events[-1]
            elif event.kind == "saved" and self.last_step is not None:
                step = self.last_step
                terms = ", ".join(f"{k} {v:.4g}" for k, v in (step.parts or {}).items())
                self.say(f"step {step.step}: loss {step.loss:.4f} ({terms}); saved")
            self.view.show_event(event)

    def _adapted(self, result: weak_jobs.AdaptResult | None) -> None:
        if result is None:
            self.say("adaptation stopped before it began")
            return
        self.weak_run = result.path
        self.set_prompt_model(result.model, result.path)
        self.say(("stopped: " if result.stopped else "") + f"the adapted model {Path(result.path).name} now "
                 "answers Segment prompts and interactive prompting")

    def set_prompt_model(self, model: Any, path: str) -> None:
        """Make ``model`` (adapted through SAM's promptable decoder) the one prompts are segmented with."""
        self.prompt_model, self.prompt_model_path, self.prompt_cache = model, path, None
        record = getattr(model.config, "promptable", None)
        scores = ""
        if record is not None and record.before and record.after:
            scores = (f"; prompt mIoU {100 * record.before['prompt_miou']:.1f}% before, "
                      f"{100 * record.after['prompt_miou']:.1f}% after")
        self.weak_form.model_info.setText(f"adapted model: {Path(path).name}{scores}")
        self._set_weak_busy(self.busy_with)

    # ---- segment prompts ---------------------------------------------------------------------------------
    def _cache_for(self, image: Image) -> tuple[tuple[Any, Any] | None, Any, Any]:
        """(the embedding cache if it serves this image, model and device; its key; a copy of the image if not)."""
        key = (image.name, id(image.data), id(self.prompt_model), self.model_form.device_name())
        if self.prompt_cache is not None and self.prompt_cache[0] == key:
            return self.prompt_cache, key, None
        return None, key, copy_image(image)

    def segment_prompts(self, whole_stack: bool | None = None, through_stack: bool | None = None) -> JobWorker | None:
        """Every prompt of the ticked layers (the plane shown, or the whole stack) as one object of
        ``"<image> instances"``; "through stack" carries each object to the planes around its own until it ends;
        with "compare", also ``"<image> instances (unadapted)"``."""
        if self.prompt_model is None:
            return self._refuse("adapt first (Adapt), or load an adapted model under Model")
        try:
            weak = self._weak_input(evaluation=False, copy=False)
        except ValueError as e:
            return self._refuse(str(e))
        name = self.weak_form.image.current()
        image = self.viewer.layers[name]
        whole = self.weak_form.whole_stack.isChecked() if whole_stack is None else whole_stack
        through = self.weak_form.through_stack.isChecked() if through_stack is None else through_stack
        if through and not weak.weak.leading_shape:
            return self._refuse(f"'{name}' is a single plane: untick through stack (it carries objects through the "
                                "planes of a stack)")
        flat = None if whole else current_plane(self.viewer, image)
        planes = None if flat is None else [plane_tuple(image, flat)]
        if planes is not None and not weak.weak.on_plane(planes[0]):
            return self._refuse(f"no prompt on the plane shown ({flat}) of '{name}': go to a plane with prompts, "
                                "or tick whole stack")
        try:
            cached, key, copy = self._cache_for(image)
        except ValueError as e:  # a layer too large to copy
            return self._refuse(str(e))
        self._show_read(name, weak.weak)
        self._set_busy("segment")
        return self._run(weak_jobs.segment_job, self.prompt_model, cached, key, copy, name, weak.weak, planes,
                         self.model_form.device_name(), compare=self.weak_form.compare.isChecked(),
                         features=weak.features, through_stack=through, on_returned=self._segmented)

    def _segmented(self, result: weak_jobs.SegmentResult) -> None:
        self.prompt_cache = result.cache
        if result.image_name not in self.viewer.layers:
            self.say(f"'{result.image_name}' was removed; instances not written")
            return
        image = self.viewer.layers[result.image_name]
        classes = {k: object_class(obj, result.features.get(obj.layer)) for k, obj in enumerate(result.objects, 1)}
        added = result.added or ()
        layer = write_prompted_instances(self.viewer, image, result.labels, classes, result.planes,
                                         instances_name(image.name), added)
        written = [layer.name]
        if result.unadapted is not None:
            written.append(write_prompted_instances(self.viewer, image, result.unadapted, classes, result.planes,
                                                    unadapted_name(image.name), added).name)
        named = sorted({c for c in classes.values() if c})
        self.say(f"wrote {' and '.join(repr(n) for n in written)}: {len(result.objects)} object(s)"
                 + (f" of class {', '.join(named)}" if named else ""))

    # ---- the bridge to the prompt-free head --------------------------------------------------------------
    def instances_to_training_labels(self) -> Labels | None:
        """``"<image> classes"`` (each instance's class, 0 background, class names as features), paired with the
        image under Training data."""
        name = self.weak_form.image.current()
        if name is None:
            return self._refuse("choose the Image layer the weak labels are drawn on")
        source = instances_name(name)
        layer = self.viewer.layers[source] if source in self.viewer.layers else None
        if not isinstance(layer, Labels):
            return self._refuse(f"no Labels layer '{source}' yet: Segment prompts or prompt interactively first")
        if not layer.data.any():
            return self._refuse(f"'{source}' holds no object: Segment prompts or prompt interactively first")
        labels, names, count = write_class_labels(self.viewer, self.viewer.layers[name], layer)
        self._pair_for_training(name, labels.name)
        self.say(f"wrote '{labels.name}': {count} object(s) as {', '.join(names[1:])}, paired with '{name}' under "
                 "Training data: Train teaches them to the prompt-free head")
        return labels

    def _pair_for_training(self, image: str, labels: str) -> None:
        form = self.data_form
        row = next((r for r in form.rows if r.image.current() == image), None)
        row = row or next((r for r in form.rows if r.image.current() is None or r.labels.current() is None), None)
        if row is None:
            form.add_pair(image, labels)
            return
        row.image.refresh(image)
        row.labels.refresh(labels)
