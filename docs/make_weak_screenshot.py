"""The README screenshot of the Weak labels tab: boxes and points drawn on the stardist nuclei image, SAM adapted
from them (WeSAM), and every prompt segmented as one instance, with the unadapted SAM's instances for comparison.

Run under Xvfb with Qt's xcb platform (an offscreen platform renders the canvas black)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_weak_screenshot.py

Writes ``docs/weak_labels.png``. The base model is the built-in small SAM (256 px), adapted for 40 steps on the
CPU; the boxes and points come from the ground-truth nuclei of the image's left half (a user would draw them).
Needs stardist's image (``pip install --no-deps stardist``); nothing is downloaded.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))

from make_screenshots import _check_not_black, _wait  # noqa: E402


def _box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([[rows.min(), cols.min()], [rows.min(), cols.max()], [rows.max(), cols.max()],
                     [rows.max(), cols.min()]], float)


def main() -> None:
    from napari_convlora.checkpoints.builtin import builtin_checkpoint  # torch first (see _napari/native_libs.py)
    from napari_convlora.data.samples import stardist_nuclei

    import napari
    from qtpy.QtCore import QCoreApplication, QSettings

    found = stardist_nuclei()
    if found is None:
        sys.exit("needs stardist's nuclei image: pip install --no-deps stardist")
    image, instances = found
    tmp = Path(tempfile.mkdtemp(prefix="convlora-weak-shot-"))
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp / "settings"))
    viewer = napari.Viewer(title="napari-convlora", show=True)
    viewer.window.resize(1500, 980)
    app = QCoreApplication.instance()
    viewer.add_image(image, name="nuclei")
    ids = [i for i in np.unique(instances[:, :256]) if i > 0]
    rng = np.random.default_rng(0)
    boxed = sorted(rng.choice(ids, size=len(ids) // 2, replace=False).tolist())
    pointed = [i for i in ids if i not in boxed]
    viewer.add_shapes([_box(instances == i) for i in boxed], shape_type="rectangle", name="boxes",
                      edge_color="yellow", face_color="transparent", edge_width=2)
    centres = [np.argwhere(instances == i).mean(axis=0) for i in pointed]
    viewer.add_points(np.array(centres), name="points", features={"label": [True] * len(centres)},
                      face_color="cyan", size=8)
    _, dock = viewer.window.add_plugin_dock_widget("napari-convlora", "Conv-LoRA fine-tuning")
    _wait(app, lambda: not dock.workers)
    dock.model_form.sam.set_path(str(builtin_checkpoint()))
    _wait(app, lambda: not dock.workers)
    dock.model_form.input_size.setValue(256)
    dock.data_form.options.run_folder.value = tmp / "runs"
    form = dock.weak_form
    form.refresh()
    form.image.refresh("nuclei")
    form.set_checked(["boxes", "points"])
    form.steps.setValue(40)
    form.compare.setChecked(True)
    dock.setup.setCurrentWidget(form)
    dock.adapt()
    _wait(app, lambda: not dock.workers)
    dock.segment_prompts()
    _wait(app, lambda: not dock.workers)
    for name in ("nuclei instances", "nuclei instances (unadapted)"):
        viewer.layers[name].opacity = 0.5
    viewer.layers["nuclei instances (unadapted)"].visible = False
    viewer.reset_view()
    for _ in range(30):
        app.processEvents()
        time.sleep(0.02)
    path = DOCS / "weak_labels.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    _check_not_black(path)
    adapted = np.asarray(viewer.layers["nuclei instances"].data)
    print(f"{len(boxed)} boxes, {len(pointed)} points -> {len(np.unique(adapted)) - 1} instances; wrote {path}")
    viewer.close()


if __name__ == "__main__":
    main()
