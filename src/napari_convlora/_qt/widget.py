"""The napari-convlora dock: annotate, fine-tune SAM, predict, correct, repeat.

Reads layers (copies on the main thread), runs the Qt-free core on the compute thread, shows events,
and writes predictions back as Labels on the main thread. Nothing here imports torch.
"""

from __future__ import annotations

import functools

from pathlib import Path
from typing import Any

from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QPushButton, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from .._napari import jobs
from .._napari.layers import copy_pair
from ..config import TrainRecipe
from ..config.choices import HQ_MODE_LABELS, SAM_CHECKPOINT_FORMAT
from ..errors import describe_error
from ..io.safety import new_run_path
from .advanced_options import DEFAULT_RUN_FOLDER
from .compute import JobWorker, compute_thread
from .forms import DataForm, ModelForm
from .predict_actions import PredictActions
from .predict_panel import PredictPanel
from .progress_view import ProgressView, eta_text
from .prompt_actions import PromptActions
from .weak_actions import WeakActions


class ConvLoRAWidget(PredictActions, WeakActions, PromptActions, QWidget):
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
        self.train_button.setToolTip("fine-tune on the Image + Labels pairs of Training data (in the background; "
                                     "napari stays usable); the run is saved in the folder under Advanced")
        self.stop_button.setToolTip("stop at the next step: the run is saved and can be resumed")
        self.resume_button.setToolTip("continue the stopped run exactly where it stopped")
        self.view = ProgressView()  # progress bar, plot, scores and log, drawn at a paced rate while jobs run
        self.progress, self.plot, self.log = self.view.progress, self.view.plot, self.view.log
        self.panel = PredictPanel(self._names(Image), self._names(Labels))
        self.predict_image, self.whole_stack = self.panel.image, self.panel.whole_stack
        self.predict_button, self.copy_button = self.panel.predict, self.panel.copy
        self.save_button, self.export_button = self.panel.save, self.panel.export
        self.confirm = self._ask  # asks before painted pixels are replaced (tests answer for the user)
        self._init_weak()  # the Weak labels tab: adapt SAM from boxes, points, coarse masks; segment prompts
        self._layout()
        self._connect()
        self._set_busy(None)
        self._run(jobs.probe_devices, on_returned=self.model_form.set_devices)
        sam, finetuned = self.model_form.sam.path(), self.model_form.finetuned.path()
        if sam and Path(sam).is_file():  # remembered from the last session
            self.load_sam(sam)
            if finetuned and Path(finetuned).is_file():
                self.load_finetuned(finetuned)
        else:  # no checkpoint chosen yet: the built-in small SAM, said as such in the log
            self.use_builtin_model()

    # ---- layout and wiring -------------------------------------------------------------------
    def _layout(self) -> None:
        train_box = QGroupBox("Train")
        train = QVBoxLayout(train_box)
        buttons = QHBoxLayout()
        for button in (self.train_button, self.stop_button, self.resume_button):
            buttons.addWidget(button)
        train.addLayout(buttons)
        train.addWidget(self.progress)
        results = QGroupBox("Curves, scores and log")
        QVBoxLayout(results).addWidget(self.view)
        self.setup = QTabWidget()  # Advanced has a tab of its own: opening it no longer pushes Predict down
        self.setup.addTab(self.model_form, "Model")
        self.setup.addTab(self.data_form, "Training data")
        self.setup.addTab(self.data_form.options.native, "Advanced")
        self.setup.addTab(self.weak_form, "Weak labels")
        content = QWidget()
        column = QVBoxLayout(content)
        for part in (self.setup, train_box, self.panel, results):
            column.addWidget(part)
        column.addStretch()
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        self.setMinimumWidth(360)

    def _connect(self) -> None:
        self.model_form.sam.changed.connect(self.load_sam)
        self.model_form.finetuned.changed.connect(self.load_finetuned)
        self.train_button.clicked.connect(lambda: self.train())
        self.resume_button.clicked.connect(lambda: self.train(resume=True))
        self.stop_button.clicked.connect(self.stop)
        self.model_form.builtin.clicked.connect(lambda: self.use_builtin_model())
        self.predict_button.clicked.connect(lambda: self.predict())
        self.copy_button.clicked.connect(lambda: self.copy_to_training_labels())
        self.panel.evaluate.clicked.connect(lambda: self.evaluate())
        self.panel.predict_files.clicked.connect(lambda: self.predict_files())
        self.panel.suggest.clicked.connect(lambda: self.suggest_where_to_label())
        self.save_button.clicked.connect(lambda: self.save())
        self.export_button.clicked.connect(lambda: self.save(bundle=True))
        self.panel.model_zoo.clicked.connect(lambda: self.export_model_zoo())
        self.view.slow_run.connect(self._slow_run)
        self._connect_weak()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._layers_changed)
        self.destroyed.connect(self.compute.stop_all)  # the dock is gone: stop (training saves)
        # and leave nothing in napari's activity dock: a plain callable, since the view (a child) is deleted first
        self.destroyed.connect(functools.partial(ProgressView.close_activity, self.view))

    def _names(self, kind: type) -> Any:
        return lambda: [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]

    def _layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and hasattr(layer, "events"):
            layer.events.name.connect(self._layers_changed)
        self.data_form.refresh()
        self.panel.refresh()
        self.weak_form.refresh()

    # ---- jobs --------------------------------------------------------------------------------
    def _run(self, job, *args, on_returned=None, on_error=None, on_yielded=None, stoppable: bool = False,
             **kwargs) -> JobWorker:
        # only bound methods of this widget: Qt drops those connections when the widget is deleted
        connect = {"yielded": on_yielded or self._on_event, "errored": on_error or self._on_error,
                   "finished": self._job_finished}
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
        """None: idle; "train" / "predict" / "adapt": the Stop button stops it; anything else: wait."""
        idle = what is None
        self.model_form.setEnabled(idle)  # the tabs stay browsable
        self.data_form.setEnabled(idle)
        self.train_button.setEnabled(idle)
        self.resume_button.setEnabled(idle and self.resumable)
        self.stop_button.setEnabled(what in ("train", "predict", "adapt"))
        for button in (self.predict_button, self.save_button, self.export_button, self.panel.evaluate,
                       self.panel.predict_files, self.panel.model_zoo):
            button.setEnabled(idle and self.model is not None)
        self.copy_button.setEnabled(idle)
        self.panel.suggest.setEnabled(idle)
        self.model_form.builtin.setEnabled(idle)
        self.view.set_running(what in ("train", "predict", "adapt"))
        self._set_weak_busy(what)

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
        """Check a SAM checkpoint as soon as it is chosen and read its geometry (a fine-tuned file chosen here is
        loaded as such); a file that cannot serve is marked in red with the reason and not remembered."""
        if path:
            self._set_busy("load")
            self._run(jobs.load_file, path, on_returned=self._loaded, on_error=self._sam_failed)

    def load_finetuned(self, path: str) -> None:
        """Load a saved adapter (on the chosen SAM checkpoint) or bundle, for Predict and Resume."""
        if path:
            self._set_busy("load")
            self._run(jobs.load_file, path, self.model_form.sam.path() or None, on_returned=self._loaded,
                      on_error=self._finetuned_failed)

    def use_builtin_model(self) -> JobWorker:
        """Choose the built-in small SAM (shipped with the package) as the base checkpoint."""
        self._set_busy("load")
        return self._run(jobs.builtin_checkpoint, on_returned=self.model_form.sam.set_path)

    def _sam_failed(self, exc: Exception) -> None:
        self.model_form.sam.set_error(describe_error(exc))
        self.model_form.info.setText("")
        self._on_error(exc)

    def _finetuned_failed(self, exc: Exception) -> None:
        self.model_form.finetuned.set_error(describe_error(exc))
        self._on_error(exc)

    def _loaded(self, loaded: jobs.LoadedFile) -> None:
        info = loaded.info
        if info["format"] == SAM_CHECKPOINT_FORMAT:
            arch = info["architecture"]
            kind = "HQ-SAM" if info.get("hq") else "SAM"
            self.model_form.info.setText(f"{kind} {info.get('model_type') or 'custom'}, {arch.get('image_size')} px, "
                                         f"{info['parameters'] / 1e6:.1f} M parameters")
            self.model_form.suggest_input_size(int(arch.get("image_size") or 1024))
            self.data_form.options.suggest_lr(int(info["parameters"]))
            self.model_form.base_has_hq(bool(info.get("hq")))
            return
        self.model, config = loaded.model, info["config"]
        head = config["head"]
        names = ", ".join(head.get("class_names") or []) or f"{head['num_classes']} classes"
        hq = head.get("hq", "off")
        method = config["adapter"]["method"] + ("" if hq == "off" or config["adapter"]["method"] == "hq" else " + HQ")
        self.model_form.info.setText(f"{method} model: {names}, input {config['input_size']} px"
                                     + ("" if hq == "off" else f", HQ output: {HQ_MODE_LABELS[hq]}"))
        self.model_form.set_model(config, Path(loaded.path).name)
        self.run_path, self.resumable = loaded.path, loaded.resumable
        if config.get("promptable"):  # adapted from weak labels: it answers prompts too
            self.set_prompt_model(loaded.model, loaded.path)
        self.say(f"loaded {Path(loaded.path).name}" + (" (training can be resumed)" if loaded.resumable else ""))

    # ---- train -------------------------------------------------------------------------------
    def recipe(self) -> TrainRecipe:
        """The training recipe the two forms describe (ValueError when a value is not allowed)."""
        return TrainRecipe(adapter=self.model_form.adapter_config(), input_size=self.model_form.input_size.value(),
                           hq=self.model_form.hq_mode(), **self.data_form.recipe_fields())

    def train(self, resume: bool = False) -> JobWorker | None:
        """Copy the chosen layers and train on the compute thread: new adapters on the base SAM, more training
        of the current model (Start from), or the stopped run resumed exactly."""
        base = self.model_form.sam.path()
        pairs = self.data_form.pairs()
        if not base:
            return self._refuse("choose a SAM checkpoint first (or the built-in model)")
        if self.model_form.sam.error:
            return self._refuse(f"the SAM checkpoint cannot be used: {self.model_form.sam.error}")
        if not pairs:
            return self._refuse("choose at least one Image layer and the Labels layer annotating it")
        if resume and not (self.run_path and self.resumable):
            return self._refuse("nothing to resume: train first, or load a model saved by training")
        init_from = self.run_path if self.model_form.continues() and not resume else None
        try:
            recipe = self.recipe()
            run = self.data_form.options.run_options(self.model_form.device_name(), self.model_form.precision_name())
            copies = [copy_pair(self.viewer.layers[i], self.viewer.layers[l]) for i, l in pairs]
        except ValueError as e:
            return self._refuse(str(e))
        if resume:  # the run continues in its own file, with its own recipe (the job reads it first)
            out_path = self.run_path
        else:
            out_path = new_run_path(Path(str(self.data_form.options.run_folder.value or DEFAULT_RUN_FOLDER)))
        self.view.start_training()
        if resume:
            self.say(f"resuming {out_path}")
        elif init_from:
            self.say(f"training {Path(init_from).name} further, into {out_path}")
        else:
            self.say(f"training new adapters into {out_path}")
        self._set_busy("train")
        return self._run(jobs.train_job, base, copies, recipe, run, out_path,
                         resume_from=out_path if resume else None, init_from=init_from, stoppable=True,
                         on_returned=self._trained)

    def _trained(self, result: jobs.TrainResult | None) -> None:
        if result is None:
            return
        self.model = result.predict_model or result.model
        if result.predict_note:
            self.say(result.predict_note)
        self.run_path, self.resumable = result.path, result.resumable and result.stopped
        self.model_form.finetuned.set_path(result.path, emit=False)
        self.model_form.set_model(result.config, Path(result.path).name)

    def _slow_run(self, eta_s: float) -> None:
        size = self.model_form.input_size.value()
        hint = (f"a smaller input size than {size} px (under Model), fewer steps, or a GPU" if size > 256
                else "fewer steps or a GPU")
        message = (f"at this speed the run needs {eta_text(eta_s).removeprefix('about ').removesuffix(' left')}: "
                   f"Stop it and try {hint}; Stop saves what was trained so far")
        self.say(message)
        show_info(f"napari-convlora: {message}")

    def stop(self) -> None:
        """Stop training at the next step (it saves) or prediction at the next tile batch."""
        for worker in self.workers:
            worker.quit()
        self.say("stopping…")

    def _refuse(self, message: str) -> None:
        self.say(message)
        show_info(f"napari-convlora: {message}")
        return None

    # ---- closing -----------------------------------------------------------------------------
    def event(self, event: QEvent) -> bool:
        # napari removes a closed dock by taking this widget out of it: stop our jobs (training saves)
        if event.type() == QEvent.Type.ParentChange and self.parent() is None and self.workers:
            self.stop()
        return super().event(event)
