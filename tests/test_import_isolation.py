"""Layering, checked in fresh interpreters: the core never imports Qt or napari; the configuration tree,
the errors and the command line's parser never import torch; importing the package imports nothing heavy."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import napari_convlora

FORBIDDEN = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy", "pyqtgraph")
SHELL = ("napari_convlora._qt", "napari_convlora._napari")


def core_modules() -> list[str]:
    """Every module of the package outside the Qt and napari shells."""
    names = [m.name for m in pkgutil.walk_packages(napari_convlora.__path__, "napari_convlora.")]
    return sorted(n for n in names if not n.startswith(SHELL))


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_every_core_module_is_found():
    modules = core_modules()
    for expected in ("napari_convlora.training.loop", "napari_convlora.modeling.heads", "napari_convlora.config.training",
                     "napari_convlora.data.rescale", "napari_convlora.cli.main", "napari_convlora.checkpoints.format_v1"):
        assert expected in modules
    assert not any(m.startswith(SHELL) for m in modules)


def test_core_does_not_import_qt_or_napari():
    modules = core_modules()
    loaded = _loaded_after("\n".join(f"import {m}" for m in modules))
    assert set(modules) <= set(loaded) and "torch" in loaded  # the core really was imported
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert bad == []


def test_config_errors_and_cli_parser_do_not_import_torch():
    loaded = _loaded_after("import napari_convlora.config, napari_convlora.errors, napari_convlora.cli\n"
                           "napari_convlora.cli.build_parser().parse_args(['info', 'x.pth'])\n"
                           "from napari_convlora.config import TrainRecipe, ModelConfig, TINY, to_record\n"
                           "to_record(ModelConfig(base=TINY)); TrainRecipe(steps=3)")
    assert "torch" not in loaded and "numpy" not in loaded
    assert not any(m.split(".")[0] in FORBIDDEN for m in loaded)


def test_package_import_is_lazy():
    loaded = _loaded_after("import napari_convlora")
    assert "torch" not in loaded and "napari_convlora.modeling" not in loaded
