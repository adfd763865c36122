"""Make the README screenshots from a real napari window: the dock while training, and a prediction.

Run under Xvfb with Qt's xcb platform (an offscreen platform renders the canvas black)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

Writes ``docs/dock_training.png`` and ``docs/prediction.png``. The base model is a tiny SAM with random
weights (no download), fine-tuned for a few hundred steps on the synthetic sample: the pictures show the
tool working, not what a real SAM checkpoint reaches.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
STEPS = 400
SHOT_AT = 300  # the training screenshot is taken at this step


def _wait(app, condition, timeout=1800.0):
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            sys.exit("timed out")
        app.processEvents()
        time.sleep(0.01)


def _check_not_black(path: Path) -> None:
    from imageio.v3 import imread

    rgb = imread(path)[..., :3]  # alpha would hide a black canvas
    if rgb.std() < 5:
        sys.exit(f"{path} looks blank (RGB std {rgb.std():.1f}): use the xcb platform under Xvfb")


def main() -> None:
    # torch and friends load before napari's OpenGL context exists (see _napari/native_libs.py)
    from napari_convlora import tiny_sam_checkpoint

    import napari
    from qtpy.QtCore import QCoreApplication, QSettings

    from napari_convlora.data.samples import CLASS_NAMES, synthetic_cells

    tmp = Path(tempfile.mkdtemp(prefix="convlora-shots-"))
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp / "settings"))
    checkpoint = tiny_sam_checkpoint(tmp / "tiny_sam_random.pth", image_size=256)

    viewer = napari.Viewer(title="napari-convlora", show=True)
    viewer.window.resize(1500, 980)
    app = QCoreApplication.instance()
    viewer.open_sample("napari-convlora", "synthetic_cells")
    _, dock = viewer.window.add_plugin_dock_widget("napari-convlora", "Conv-LoRA fine-tuning")
    _wait(app, lambda: not dock.workers)
    dock.model_form.sam.set_path(str(checkpoint))
    _wait(app, lambda: not dock.workers)
    dock.model_form.input_size.setValue(256)  # what the dock proposes for this checkpoint on a CPU
    dock.data_form.class_names.setText(", ".join(CLASS_NAMES))
    dock.data_form.length.setValue(STEPS)
    options = dock.data_form.options  # the Advanced form (magicgui)
    options.lr.value = 1e-3
    options.batch_size.value = 2
    options.grad_accum.value = 2
    options.run_folder.value = tmp / "runs"
    dock.data_form.val_fraction.setValue(0.15)

    dock.setup.setCurrentIndex(1)  # the "Training data" tab
    dock.train()
    _wait(app, lambda: dock.progress.value() >= SHOT_AT)
    dock.scroll.ensureWidgetVisible(dock.view.scores, 0, 0)  # the plot, the table of the last validation
    for _ in range(30):  # let the plot redraw
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(DOCS / "dock_training.png"), canvas_only=False, flash=False)
    _wait(app, lambda: not dock.workers)

    image, _ = synthetic_cells(384, seed=7)  # an image the model never saw
    viewer.add_image(image, name="new cells")
    for name in ("cells", "cells labels"):
        viewer.layers[name].visible = False
    dock.predict_image.refresh("new cells")
    dock.predict()
    _wait(app, lambda: not dock.workers)
    prediction = viewer.layers["new cells prediction"]
    prediction.opacity = 0.55
    dock.setup.setCurrentIndex(0)  # the Model tab: where training starts now (the model just trained)
    dock.scroll.ensureWidgetVisible(dock.panel.legend, 0, 0)  # the pixels of each class
    viewer.layers.selection.active = prediction
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(DOCS / "prediction.png"), canvas_only=False, flash=False)
    present = np.unique(prediction.data)
    print(f"prediction classes present: {[CLASS_NAMES[v] for v in present]}")
    for name in ("dock_training.png", "prediction.png"):
        _check_not_black(DOCS / name)
        print(f"wrote {DOCS / name}")
    viewer.close()


if __name__ == "__main__":
    main()
