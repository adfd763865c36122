"""What the dock's Predict section does: predict (the plane shown, a stack, files), copy into the training labels,
evaluate, save and export. A mixin of the dock widget, which provides ``viewer``, ``model``, ``panel``, ``view``,
the forms and the job runner (``_run``, ``_set_busy``, ``say``, ``_refuse``)."""

from __future__ import annotations

from pathlib import Path

from napari.layers import Image, Labels
from qtpy.QtWidgets import QFileDialog, QMessageBox

from .._napari import block_predict, jobs
from .._napari.layers import (CopyPlan, class_colours, copy_image, copy_pair, copy_plane, copy_prediction,
                              current_plane, find_labels_for, held_lazily, instances_name, plan_copy, prediction_name,
                              training_colours, write_instances, write_prediction)
from .._napari.uncertainty_layers import labelled_pixels, uncertainty_name, write_suggestions, write_uncertainty
from ..data.labels import SPARSE_MODES
from ..io.safety import check_outputs_are_not_inputs
from ..config.choices import INSTANCE_METHOD_LABELS
from ..metrics import class_labels, class_pixel_counts, format_line
from .compute import JobWorker
from .fields import settings
from .forms import MODEL_FILTER

#: A prediction written back: in memory (``jobs.predict_job``) or block by block (``block_predict``).
AnyPrediction = jobs.PredictResult | block_predict.BlockPredictResult


class PredictActions:
    """Predict, Predict files…, Copy to training labels, Evaluate, Save adapter, Export bundle, Model Zoo export."""

    # ---- predict, correct, evaluate, save ----------------------------------------------------
    def predict(self, whole_stack: bool | None = None) -> JobWorker | None:
        """Segment the chosen image (the plane shown, or the whole stack) with the current model."""
        name = self.predict_image.current()
        if self.model is None:
            return self._refuse("train or load a fine-tuned model first")
        if name is None:
            return self._refuse("choose an Image layer to predict")
        layer = self.viewer.layers[name]
        whole = self.whole_stack.isChecked() if whole_stack is None else whole_stack
        plane = None if whole else current_plane(self.viewer, layer)
        if held_lazily(layer):
            return self._predict_blockwise(layer, plane)
        progress = self.view.start_prediction()
        self._set_busy("predict")
        return self._run(jobs.predict_job, self.model, copy_image(layer), None if plane is None else [plane],
                         self.model_form.device_name(), progress, stoppable=True,
                         instances=self.panel.instances.isChecked(),
                         instance_method=self.panel.instance_method.currentData(), on_returned=self._predicted)

    def _predicted(self, result: jobs.PredictResult | None) -> None:
        if result is None:
            self.say("prediction stopped")
            return
        if result.image_name not in self.viewer.layers:
            self.say(f"'{result.image_name}' was removed; prediction not written")
            return
        image = self.viewer.layers[result.image_name]
        colours = self._class_colours(result)
        layer = write_prediction(self.viewer, image, result.labels, result.class_values, result.class_names,
                                 result.background_value, result.planes, colours)
        if result.instances is not None:
            write_instances(self.viewer, image, result.instances, result.planes)
        if result.uncertainty is not None:
            write_uncertainty(self.viewer, image, result.uncertainty, result.planes)
        predicted = result.labels if result.planes is None else \
            result.labels.reshape(-1, *result.labels.shape[-2:])[result.planes]
        counts = class_pixel_counts(predicted, result.class_values)
        written = f"wrote '{layer.name}'" + (
            f", '{instances_name(image.name)}' ({INSTANCE_METHOD_LABELS[result.instance_method]})"
            if result.instances is not None else "") + (
            f" and '{uncertainty_name(image.name)}'" if result.uncertainty is not None else "")
        self._report(result, layer.name, counts, colours, written)

    def suggest_where_to_label(self) -> int | None:
        """Mark where labelling the plane shown of the chosen image would help most; returns how many regions."""
        name = self.predict_image.current()
        if name is None:
            return self._refuse("choose an Image layer to predict")
        image = self.viewer.layers[name]
        unsure = self.viewer.layers[uncertainty_name(name)] if uncertainty_name(name) in self.viewer.layers else None
        if not isinstance(unsure, Image):
            return self._refuse(f"predict '{name}' first: suggestions follow its '{uncertainty_name(name)}' layer")
        plane = current_plane(self.viewer, image)
        labels = find_labels_for(self.viewer, name, self.data_form.pairs())
        try:
            labelled = labelled_pixels(labels, plane, self.data_form.mode())
            points = write_suggestions(self.viewer, image, unsure, plane, labelled)
        except ValueError as error:
            return self._refuse(str(error))
        where = "" if plane is None else f" of plane {plane}"
        if len(points.data) == 0:
            self.say(f"'{name}'{where}: the model is sure everywhere nobody labelled; nothing to suggest")
        else:
            self.say(f"marked {len(points.data)} regions{where} of '{name}' where labelling would help most in "
                     f"'{points.name}' (most uncertain first)")
        return len(points.data)

    def _class_colours(self, result: AnyPrediction) -> dict[int, str]:
        """The colours of the classes of a prediction: those of the training labels of its image, if any."""
        paired = find_labels_for(self.viewer, result.image_name, self.data_form.pairs()) or self._training_labels()
        return class_colours(result.class_values, result.background_value,
                             training_colours(paired, result.class_values, result.background_value))

    def _report(self, result: AnyPrediction, layer_name: str, counts: dict[int, int], colours: dict[int, str],
                written: str) -> None:
        """The legend and the log line of a prediction written; a warning when classes are absent."""
        names = class_labels(result.class_names, len(result.class_values))
        self.panel.show_counts(layer_name, counts, names, colours, result.background_value)
        absent = [n for (v, c), n in zip(counts.items(), names) if c == 0 and v != result.background_value]
        self.say(written + ": " + ", ".join(f"{n} {c:,} px" for n, c in zip(names, counts.values())))
        if absent:
            self._refuse(f"the prediction of '{result.image_name}' holds no {' and no '.join(absent)}: train "
                         "longer, annotate more of " + ("it" if len(absent) == 1 else "them") + ", or check "
                         "the class's labels")

    def _predict_blockwise(self, layer: Image, plane: int | None) -> JobWorker | None:
        """Predict a layer held lazily block by block into a Zarr store (chosen, else temporary), never whole; into
        the store of its prediction layer when one exists (the other planes, and what was painted, stay). Objects
        are connected components stitched across blocks there: the instance head runs on images held whole."""
        method = self.panel.instance_method.currentData()
        if self.panel.instances.isChecked() and method in ("head", "sam_refined", "everything"):
            return self._refuse(f"'{layer.name}' is held lazily and predicted block by block, where objects are "
                                "connected components: choose 'connected components' or 'auto' for instances")
        try:
            outputs = block_predict.block_outputs(self.panel.store.path(), layer.name,
                                                  self.panel.instances.isChecked(),
                                                  block_predict.existing_stores(self.viewer, layer))
        except ValueError as e:
            return self._refuse(str(e))
        progress = self.view.start_prediction(block_predict.BLOCKS_TEXT)
        self._set_busy("predict")
        return self._run(block_predict.predict_blockwise_job, self.model, block_predict.lazy_layer(layer),
                         None if plane is None else [plane], self.model_form.device_name(), progress, outputs,
                         stoppable=True, on_returned=self._predicted_blockwise)

    def _predicted_blockwise(self, result: block_predict.BlockPredictResult | None) -> None:
        if result is None:
            self.say("prediction stopped: nothing was written")
            return
        if result.image_name not in self.viewer.layers:
            into = result.added.get("labels")
            self.say(f"'{result.image_name}' was removed; its prediction is in "
                     f"{into.store if into else result.outputs.labels}")
            return
        colours = self._class_colours(result)
        written = block_predict.write_lazy_prediction(self.viewer, self.viewer.layers[result.image_name], result,
                                                      colours)
        layer, instances = written.labels, written.instances
        where = "the whole image" if result.planes is None else f"plane {result.planes[0]}"
        text = (f"{'added ' + where + ' to' if result.added else 'wrote'} '{layer.name}'"
                + (f" and '{instances.name}' ({result.instances:,} objects)" if instances is not None else "")
                + f" ({result.blocks} blocks, {result.seconds:.0f} s)")
        self._report(result, layer.name, result.pixel_counts, colours, text)
        for line in written.notes + [f"'{one.name}' is {block_predict.stores_note(one)}"
                                     for one in (layer, instances) if one is not None]:
            self.say(line)

    def _training_labels(self) -> Labels | None:
        """The first Labels layer under Training data (its colours are the classes' colours)."""
        names = [labels for _, labels in self.data_form.pairs() if labels in self.viewer.layers]
        return self.viewer.layers[names[0]] if names else None

    def _ask(self, question: str) -> bool:
        answer = QMessageBox.question(self, "napari-convlora", question,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
                                      QMessageBox.StandardButton.Cancel)
        return answer == QMessageBox.StandardButton.Yes

    def copy_to_training_labels(self, mode: str | None = None) -> int | None:
        """Copy the prediction of the chosen image into its training Labels layer: only into pixels nobody
        painted, or everywhere it predicted. Painted pixels are replaced only when the user agrees to the count
        asked (in dense and instances modes 0 is painted background: every pixel is painted). Ctrl+Z undoes it."""
        name = self.predict_image.current()
        source = prediction_name(name) if name else None
        if source not in self.viewer.layers:
            return self._refuse("predict the image first")
        target = find_labels_for(self.viewer, name, self.data_form.pairs())
        if target is None:
            return self._refuse(f"pair '{name}' with a Labels layer under Training data first")
        prediction = self.viewer.layers[source]
        unpainted_planes = self.data_form.unpainted.currentData()
        try:
            plan = plan_copy(prediction, target, mode or self.panel.copy_mode_name(), self.data_form.mode(),
                             unpainted_planes)
            if plan.painted and not self.confirm(copy_question(plan, target.name)):
                return self._refuse(f"nothing copied: '{target.name}' is as it was")
            changed = copy_prediction(prediction, target, plan.mode, label_mode=plan.label_mode,
                                      unpainted_planes=unpainted_planes)
        except ValueError as e:
            return self._refuse(str(e))
        where = "unpainted pixels" if plan.mode == "unpainted" else "pixels"
        self.say(f"copied {changed:,} {where} into '{target.name}' (Ctrl+Z in that layer undoes it): correct them, "
                 "then Train again")
        return changed

    def predict_files(self, paths: list[str] | None = None, out_dir: str | None = None) -> JobWorker | None:
        """Segment image files (chosen in a dialog) into a folder, one label image per file, without opening them."""
        if self.model is None:
            return self._refuse("train or load a fine-tuned model first")
        start = str(settings().value("last_folder", str(Path.home())))
        if paths is None:
            paths, _ = QFileDialog.getOpenFileNames(self, "Images to predict", start,
                                                    "Images (*.tif *.tiff *.png *.jpg *.jpeg *.bmp *.nii *.nii.gz "
                                                    "*.nrrd);;All files (*)")
            if not paths:
                return None
        if out_dir is None:
            out_dir = QFileDialog.getExistingDirectory(self, "Folder for the label images", str(Path(paths[0]).parent))
            if not out_dir:
                return None
        progress = self.view.start_prediction()
        self._set_busy("predict")
        return self._run(jobs.predict_files_job, self.model, list(paths), out_dir, self.model_form.device_name(),
                         progress, instances=self.panel.instances.isChecked(), stoppable=True,
                         instance_method=self.panel.instance_method.currentData(), on_returned=self.say)

    def evaluate(self) -> JobWorker | None:
        """Score the current model on the chosen image against the chosen Labels layer (per-class table)."""
        name, labels = self.predict_image.current(), self.panel.evaluate_labels.current()
        if self.model is None:
            return self._refuse("train or load a fine-tuned model first")
        if name is None or labels is None:
            return self._refuse("choose the Image layer (above) and the Labels layer to evaluate against")
        try:
            pair = copy_pair(self.viewer.layers[name], self.viewer.layers[labels])
        except ValueError as e:
            return self._refuse(str(e))
        self._set_busy("evaluate")
        return self._run(jobs.evaluate_job, self.model, pair, labels, self.model_form.device_name(),
                         on_returned=self._evaluated)

    def _evaluated(self, result: jobs.EvaluateResult) -> None:
        caption = f"Evaluation of '{result.image_name}' against '{result.labels_name}'."
        self.view.scores.show_metrics(result.metrics, result.class_names, caption)
        self.say(f"evaluated '{result.image_name}' against '{result.labels_name}': "
                 f"{format_line(result.metrics, result.class_names)}")

    def save(self, bundle: bool = False, path: str | None = None) -> JobWorker | None:
        """Save the adapter (small; needs the base SAM to load) or export one bundle file (file dialog)."""
        if self.model is None:
            return self._refuse("nothing to save yet: train or load a model")
        if path is None:
            start = str(Path(str(settings().value("last_folder", Path.home()))) /
                        ("model-bundle.safetensors" if bundle else "adapter.safetensors"))
            path, _ = QFileDialog.getSaveFileName(self, "Export bundle" if bundle else "Save adapter",
                                                  start, MODEL_FILTER)
            if not path:
                return None
        base = self.model_form.sam.path() or None
        try:  # never over the SAM checkpoint chosen; the job also refuses the one the model was built on
            check_outputs_are_not_inputs({"the file chosen": path}, {"the SAM checkpoint": base})
        except ValueError as e:
            return self._refuse(str(e))
        self._set_busy("save")
        return self._run(jobs.save_job, self.model, path, bundle, base, on_returned=self._saved)

    def _saved(self, path: str) -> None:
        self.say(f"saved {path}")

    def export_model_zoo(self, path: str | None = None) -> JobWorker | None:
        """Export the model as a BioImage Model Zoo package; its test image comes from the chosen image."""
        if self.model is None:
            return self._refuse("nothing to export yet: train or load a model")
        if path is None:
            start = str(Path(str(settings().value("last_folder", Path.home()))) / "model.bioimageio.zip")
            path, _ = QFileDialog.getSaveFileName(self, "Export for the BioImage Model Zoo", start,
                                                  "BioImage Model Zoo packages (*.zip)")
            if not path:
                return None
        from ..bioimageio.export import TEST_SIDE  # torch is loaded already: a model exists

        name = self.predict_image.current()
        layer = self.viewer.layers[name] if name else None
        # the test input is a centre crop of the plane shown: only that crop is read (a lazy layer stays lazy)
        image = copy_plane(layer, current_plane(self.viewer, layer), TEST_SIDE) if layer is not None else None
        self._set_busy("save")
        return self._run(jobs.model_zoo_job, self.model, path, image, None,
                         on_returned=self._exported)

    def _exported(self, path: str) -> None:
        self.say(f"wrote the BioImage Model Zoo package {path}")


def copy_question(plan: CopyPlan, target: str) -> str:
    """The question asked before a copy replaces painted pixels, with their count (and, in the modes where 0 is
    painted background, why they are painted)."""
    why = "" if plan.label_mode in SPARSE_MODES else f"In {plan.label_mode} mode 0 is painted background. "
    return (f"{why}Replace {plan.painted:,} painted pixels of '{target}' with the prediction? Ctrl+Z in '{target}' "
            "undoes it.")
