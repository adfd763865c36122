"""The napari-convlora dock: annotate, fine-tune SAM, predict, correct, repeat.

Reads layers (copies on the main thread), runs the Qt-free core on the compute thread, shows events,
and writes predictions back as Labels on the main thread. Nothing here imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .._napari import jobs
from .._napari.layers import (
    copy_image,
    copy_pair,
    copy_prediction,
    current_plane,
    find_labels_for,
    prediction_name,
    write_prediction,
)
from ..config import TrainRecipe
from ..config.choices import SAM_CHECKPOINT_FORMAT
from ..errors import describe_error
from ..safety import check_outputs_are_not_inputs
from .compute import JobWorker, compute_thread
from .fields import LayerCombo, settings
from .forms import DEFAULT_RUN_FOLDER, MODEL_FILTER, DataForm, ModelForm
from .progress_view import ProgressView


class ConvLoRAWidget(QWidget):
    """Plugins > napari-convlora: the whole annotate-then-fine-tune loop in one dock."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.compute = compute_thread()
        self.model: Any = None  # the fine-tuned model, used by Predict and Save (lives on the compute thread)
        self.run_path: str | None = None  # the training file that Resume continues
        self.resumable = False
        self.workers: list[JobWorker] = []  # this dock's running jobs

        self.model_form = ModelForm()
        self.data_form = DataForm(self._names(Image), self._names(Labels))
        self.train_button, self.stop_button, self.resume_button = (QPushButton(t) for t in ("Train", "Stop", "Resume"))
        self.view = ProgressView()  # progress bar, plot and log, drawn at a paced rate while jobs run
        self.progress, self.plot, self.log = self.view.progress, self.view.plot, self.view.log
        self.predict_image = LayerCombo(self._names(Image), "(no Image layer)")
        self.whole_stack = QCheckBox("whole stack")
        self.whole_stack.setToolTip("predict every plane of a stack (else only the plane shown)")
        self.predict_button = QPushButton("Predict")
        self.copy_button = QPushButton("Copy to training labels")
        self.copy_button.setToolTip("copy the prediction into the Labels layer paired with this image, to correct it")
        self.save_button = QPushButton("Save adapter…")
        self.save_button.setToolTip("only the trained tensors (small); loading it needs the same SAM checkpoint")
        self.export_button = QPushButton("Export bundle…")
        self.export_button.setToolTip("one self-contained file: the SAM checkpoint, adapters and head side by side "
                                      "(weights are bundled, not merged), to share or to load without the checkpoint")
        self._layout()
        self._connect()
        self._set_busy(None)
        self._run(jobs.probe_devices, on_returned=self.model_form.set_devices)
        sam, finetuned = self.model_form.sam.path(), self.model_form.finetuned.path()
        if sam and Path(sam).is_file():  # remembered from the last session
            self.load_sam(sam)
            if finetuned and Path(finetuned).is_file():
                self.load_finetuned(finetuned)

    # ---- layout and wiring -------------------------------------------------------------------
    def _layout(self) -> None:
        train_box = QGroupBox("Train")
        train = QVBoxLayout(train_box)
        buttons = QHBoxLayout()
        for button in (self.train_button, self.stop_button, self.resume_button):
            buttons.addWidget(button)
        train.addLayout(buttons)
        train.addWidget(self.view)
        predict_box = QGroupBox("Predict")
        predict = QVBoxLayout(predict_box)
        row = QHBoxLayout()
        row.addWidget(self.predict_image, 1)
        row.addWidget(self.whole_stack)
        predict.addLayout(row)
        for pair in ((self.predict_button, self.copy_button), (self.save_button, self.export_button)):
            row = QHBoxLayout()
            row.addWidget(pair[0])
            row.addWidget(pair[1])
            predict.addLayout(row)
        self.setup = QTabWidget()
        self.setup.addTab(self.model_form, "Model")
        self.setup.addTab(self.data_form, "Training data")
        content = QWidget()
        column = QVBoxLayout(content)
        for part in (self.setup, train_box, predict_box):
            column.addWidget(part)
        column.addStretch()
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(360)

    def _connect(self) -> None:
        self.model_form.sam.changed.connect(self.load_sam)
        self.model_form.finetuned.changed.connect(self.load_finetuned)
        self.train_button.clicked.connect(lambda: self.train())
        self.resume_button.clicked.connect(lambda: self.train(resume=True))
        self.stop_button.clicked.connect(self.stop)
        self.predict_button.clicked.connect(lambda: self.predict())
        self.copy_button.clicked.connect(lambda: self.copy_to_training_labels())
        self.save_button.clicked.connect(lambda: self.save())
        self.export_button.clicked.connect(lambda: self.save(bundle=True))
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._layers_changed)
        self.destroyed.connect(self.compute.stop_all)  # the dock is gone: stop (training saves)

    def _names(self, kind: type) -> Any:
        return lambda: [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]

    def _layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and hasattr(layer, "events"):
            layer.events.name.connect(self._layers_changed)
        self.data_form.refresh()
        self.predict_image.refresh()

    # ---- jobs --------------------------------------------------------------------------------
    def _run(self, job, *args, on_returned=None, stoppable: bool = False, **kwargs) -> JobWorker:
        # only bound methods of this widget: Qt drops those connections when the widget is deleted
        connect = {"yielded": self._on_event, "errored": self._on_error, "finished": self._job_finished}
        if on_returned is not None:
            connect["returned"] = on_returned
        worker = self.compute.start(job, *args, stoppable=stoppable, connect=connect, **kwargs)
        self.workers.append(worker)
        return worker

    def _job_finished(self) -> None:
        self.workers = [worker for worker in self.workers if not worker.ended]
        if not self.workers:
            self._set_busy(None)

    def _set_busy(self, what: str | None) -> None:
        """None: idle; "train" / "predict": the Stop button stops it; anything else: wait."""
        idle = what is None
        self.model_form.setEnabled(idle)  # the tabs stay browsable
        self.data_form.setEnabled(idle)
        self.train_button.setEnabled(idle)
        self.resume_button.setEnabled(idle and self.resumable)
        self.stop_button.setEnabled(what in ("train", "predict"))
        for button in (self.predict_button, self.save_button, self.export_button):
            button.setEnabled(idle and self.model is not None)
        self.copy_button.setEnabled(idle)
        self.view.set_running(what in ("train", "predict"))

    @property
    def events_seen(self) -> list[str]:
        """Training event kinds received, in order."""
        return self.view.events_seen

    def say(self, text: str) -> None:
        self.view.say(text)

    def _on_error(self, exc: Exception) -> None:
        message = describe_error(exc)
        self.say(f"Error: {message}")
        show_error(f"napari-convlora: {message}")

    def _on_event(self, event: Any) -> None:
        if isinstance(event, jobs.Message):
            self.say(event.text)
        else:
            self.view.show_event(event, self.data_form.names())

    # ---- model files -------------------------------------------------------------------------
    def load_sam(self, path: str) -> None:
        """Read a SAM checkpoint's geometry (a fine-tuned file chosen here is loaded as such)."""
        if path:
            self._set_busy("load")
            self._run(jobs.load_file, path, on_returned=self._loaded)

    def load_finetuned(self, path: str) -> None:
        """Load a saved adapter (on the chosen SAM checkpoint) or bundle, for Predict and Resume."""
        if path:
            self._set_busy("load")
            self._run(jobs.load_file, path, self.model_form.sam.path() or None, on_returned=self._loaded)

    def _loaded(self, loaded: jobs.LoadedFile) -> None:
        info = loaded.info
        if info["format"] == SAM_CHECKPOINT_FORMAT:
            arch = info["architecture"]
            self.model_form.info.setText(f"SAM {info.get('model_type') or 'custom'}, {arch.get('image_size')} px, "
                                         f"{info['parameters'] / 1e6:.1f} M parameters")
            return
        self.model, config = loaded.model, info["config"]
        head = config["head"]
        names = ", ".join(head.get("class_names") or []) or f"{head['num_classes']} classes"
        self.model_form.info.setText(f"{config['adapter']['method']} model: {names}, input {config['input_size']} px")
        self.run_path, self.resumable = loaded.path, loaded.resumable
        self.say(f"loaded {Path(loaded.path).name}" + (" (training can be resumed)" if loaded.resumable else ""))

    # ---- train -------------------------------------------------------------------------------
    def recipe(self) -> TrainRecipe:
        """The training recipe the two forms describe (ValueError when a value is not allowed)."""
        return TrainRecipe(adapter=self.model_form.adapter_config(), input_size=self.model_form.input_size.value(),
                           **self.data_form.recipe_fields())

    def train(self, resume: bool = False) -> JobWorker | None:
        """Copy the chosen layers and train (or resume the last run) on the compute thread."""
        base = self.model_form.sam.path()
        pairs = self.data_form.pairs()
        if not base:
            return self._refuse("choose a SAM checkpoint first")
        if not pairs:
            return self._refuse("choose at least one Image layer and the Labels layer annotating it")
        if resume and not (self.run_path and self.resumable):
            return self._refuse("nothing to resume: train first, or load a model saved by training")
        try:
            recipe = self.recipe()
            run = self.data_form.options.run_options(self.model_form.device_name(), self.model_form.precision_name())
        except ValueError as e:
            return self._refuse(str(e))
        copies = [copy_pair(self.viewer.layers[i], self.viewer.layers[l]) for i, l in pairs]
        if resume:  # the run continues in its own file, with its own recipe (the job reads it first)
            out_path = self.run_path
        else:
            folder = Path(str(self.data_form.options.run_folder.value or DEFAULT_RUN_FOLDER))
            out_path = str(folder / f"convlora-{time.strftime('%Y%m%d-%H%M%S')}.safetensors")
        self.view.start_training()
        self.say(("resuming " if resume else "training into ") + out_path)
        self._set_busy("train")
        return self._run(jobs.train_job, base, copies, recipe, run, out_path,
                         resume_from=out_path if resume else None, stoppable=True, on_returned=self._trained)

    def _trained(self, result: jobs.TrainResult | None) -> None:
        if result is None:
            return
        self.model = result.model
        self.run_path, self.resumable = result.path, result.resumable and result.stopped
        self.model_form.finetuned.set_path(result.path, emit=False)

    def stop(self) -> None:
        """Stop training at the next step (it saves) or prediction at the next tile batch."""
        for worker in self.workers:
            worker.quit()
        self.say("stopping…")

    def _refuse(self, message: str) -> None:
        self.say(message)
        show_info(f"napari-convlora: {message}")
        return None

    # ---- predict, correct, save --------------------------------------------------------------
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
        progress = self.view.start_prediction()
        self._set_busy("predict")
        return self._run(jobs.predict_job, self.model, copy_image(layer), None if plane is None else [plane],
                         self.model_form.device_name(), progress, stoppable=True,
                         on_returned=self._predicted)

    def _predicted(self, result: jobs.PredictResult | None) -> None:
        if result is None:
            self.say("prediction stopped")
            return
        if result.image_name not in self.viewer.layers:
            self.say(f"'{result.image_name}' was removed; prediction not written")
            return
        layer = write_prediction(self.viewer, self.viewer.layers[result.image_name], result.labels,
                                 result.class_values, result.class_names, result.background_value, result.planes)
        self.say(f"wrote '{layer.name}'")

    def copy_to_training_labels(self) -> int | None:
        """Copy the prediction of the chosen image into its training Labels layer (undo with Ctrl+Z)."""
        name = self.predict_image.current()
        source = prediction_name(name) if name else None
        if source not in self.viewer.layers:
            return self._refuse("predict the image first")
        target = find_labels_for(self.viewer, name, self.data_form.pairs())
        if target is None:
            return self._refuse(f"pair '{name}' with a Labels layer under Training data first")
        try:
            changed = copy_prediction(self.viewer.layers[source], target)
        except ValueError as e:
            return self._refuse(str(e))
        self.say(f"copied {changed:,} pixels into '{target.name}': correct them, then Train again")
        return changed

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
        try:  # never over the SAM checkpoint that adapters are loaded on
            base = self.model_form.sam.path() or None
            check_outputs_are_not_inputs({"the file chosen": path}, {"the SAM checkpoint": base})
        except ValueError as e:
            return self._refuse(str(e))
        self._set_busy("save")
        return self._run(jobs.save_job, self.model, path, bundle, on_returned=self._saved)

    def _saved(self, path: str) -> None:
        self.say(f"saved {path}")

    # ---- closing -----------------------------------------------------------------------------
    def event(self, event: QEvent) -> bool:
        # napari removes a closed dock by taking this widget out of it: stop our jobs (training saves)
        if event.type() == QEvent.Type.ParentChange and self.parent() is None and self.workers:
            self.stop()
        return super().event(event)
