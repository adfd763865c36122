"""napari's menus (issue 25, item 3): the manifest contributes the dock to Layers > Segment and Layers > Annotate,
and choosing the entry opens it; the manifest at the top of the repository is the one the package ships."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.gui]

ROOT = Path(__file__).resolve().parents[2]
MENUS = ("napari/layers/segment", "napari/layers/annotate")


def test_the_dock_opens_from_the_layers_menus(make_napari_viewer):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    app = get_app_model()
    for menu in MENUS:
        titles = {item.command.id: item.command.title for item in app.menus.get_menu(menu)
                  if hasattr(item, "command")}
        assert titles.get("napari-convlora.dock") == "Conv-LoRA fine-tuning (napari-convlora)", menu
    app.commands.execute_command("napari-convlora.dock").result()
    assert "Conv-LoRA fine-tuning (napari-convlora)" in viewer.window.dock_widgets


def test_the_shipped_manifest_is_the_repository_one_and_declares_the_menus():
    from npe2 import PluginManifest

    shipped = ROOT / "src" / "napari_convlora" / "napari.yaml"
    assert shipped.read_text() == (ROOT / "napari.yaml").read_text()
    menus = PluginManifest.from_file(shipped).contributions.menus
    assert all([item.command for item in menus[menu]] == ["napari-convlora.dock"] for menu in MENUS)
