"""Small form fields: a remembered file path, a layer chooser, and the plugin's settings store."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qtpy.QtCore import QSettings, Signal
from qtpy.QtGui import QStandardItemModel
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget

ORGANIZATION = APPLICATION = "napari-convlora"


def settings() -> QSettings:
    """The plugin's settings (an INI file in Qt's user config folder; tests redirect it with
    ``QSettings.setPath(IniFormat, UserScope, tmp_dir)``)."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANIZATION, APPLICATION)


class PathField(QWidget):
    """A path with a browse button; the last value is remembered under ``key`` between sessions.

    ``changed(path)`` is emitted when the user picks a file or presses Enter in the text box."""

    changed = Signal(str)

    def __init__(self, key: str, caption: str, file_filter: str = "", directory: bool = False,
                 placeholder: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.key, self.caption, self.file_filter, self.directory = key, caption, file_filter, directory
        self.error: str | None = None
        self.edit = QLineEdit(str(settings().value(key, "") or ""))
        self.edit.setPlaceholderText(placeholder)
        self.edit.setToolTip(caption)
        self.edit.returnPressed.connect(lambda: self.set_path(self.edit.text()))
        self.button = QPushButton("…")
        self.button.setFixedWidth(30)
        self.button.setToolTip(caption)
        self.button.clicked.connect(self.browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit)
        row.addWidget(self.button)

    def path(self) -> str:
        return self.edit.text().strip()

    def set_path(self, path: str, emit: bool = True) -> None:
        """Show ``path``, remember it and (with ``emit``) announce it."""
        path = str(path).strip()
        self.edit.setText(path)
        self.set_error(None)
        settings().setValue(self.key, path)
        if emit:
            self.changed.emit(path)

    def set_error(self, message: str | None) -> None:
        """Mark the path as unusable (red frame, the reason as tooltip) and forget it for the next session;
        None clears the mark."""
        self.error = message
        self.edit.setStyleSheet("QLineEdit { border: 1px solid #e53935; }" if message else "")
        self.edit.setToolTip(message or self.caption)
        if message:
            settings().remove(self.key)

    def browse(self) -> None:
        start = self.path() or str(settings().value("last_folder", str(Path.home())))
        if self.directory:
            path = QFileDialog.getExistingDirectory(self, self.caption, start)
        else:
            path, _ = QFileDialog.getOpenFileName(self, self.caption, start, self.file_filter)
        if path:
            settings().setValue("last_folder", str(Path(path).parent))
            self.set_path(path)


class LayerCombo(QComboBox):
    """Chooses a layer by name among those ``names()`` returns; the list is refreshed when it opens and
    whenever the widget calls :meth:`refresh` (layers added, removed or renamed)."""

    def __init__(self, names: Callable[[], list[str]], empty: str = "(none)", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.names, self.empty = names, empty
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(8)
        self.refresh()

    def refresh(self, prefer: str | None = None) -> None:
        current = prefer or self.current()
        names = self.names()
        self.blockSignals(True)
        self.clear()
        self.addItems(names or [self.empty])
        if current in names:
            self.setCurrentIndex(names.index(current))
        self.blockSignals(False)
        if current not in names:
            self.currentIndexChanged.emit(self.currentIndex())

    def current(self) -> str | None:
        text = self.currentText()
        return None if not text or text == self.empty else text

    def showPopup(self) -> None:
        self.refresh()
        super().showPopup()


def set_item_enabled(combo: QComboBox, index: int, enabled: bool, text: str | None = None) -> None:
    """Grey out (or enable) one entry of a combo box, optionally renaming it."""
    model = combo.model()
    if isinstance(model, QStandardItemModel):
        item = model.item(index)
        item.setEnabled(enabled)
        if text is not None:
            item.setText(text)
