"""The core never imports Qt or napari; importing the package does not even import torch."""

from __future__ import annotations

import json
import subprocess
import sys

CORE_MODULES = [
    "napari_convlora.sam_loading",
    "napari_convlora.model",
    "napari_convlora.files",
    "napari_convlora.adapters.inject",
]
FORBIDDEN = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_core_does_not_import_qt_or_napari():
    imports = "\n".join(f"import {m}" for m in CORE_MODULES)
    loaded = _loaded_after(imports + "\nimport napari_convlora as n; n.ConvLoRASAM; n.load_model")
    assert "torch" in loaded  # the core really was imported
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN and not m.startswith("napari_convlora")]
    assert bad == []


def test_package_import_is_lazy():
    loaded = _loaded_after("import napari_convlora")
    assert "torch" not in loaded and "napari_convlora.model" not in loaded
