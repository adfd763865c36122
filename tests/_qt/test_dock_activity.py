"""napari's conventions for long work (issue 25, items 3 and 4): training and prediction report to napari's
activity dock through ``napari.utils.progress`` as well as the dock's bar, and the bar ends saying "done"."""

from __future__ import annotations

import pytest

from dock_fixtures import STEPS, _train, _wait_idle

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("isolated_settings", "one_torch_thread")]


def test_training_and_prediction_report_to_the_activity_dock_and_the_bar_ends_done(dock, viewer, qtbot,
                                                                                 monkeypatch):
    import napari.utils

    seen: list[dict] = []

    class Recorded(napari.utils.progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.record = {"desc": kwargs.get("desc"), "totals": [], "counts": [], "closed": False}
            seen.append(self.record)

        def update(self, n=1):
            super().update(n)
            self.record["totals"].append(self.total)
            self.record["counts"].append(self.n)

        def close(self):
            self.record["closed"] = True
            super().close()

    monkeypatch.setattr(napari.utils, "progress", Recorded)
    _train(dock, qtbot)
    training = [r for r in seen if r["desc"] == "napari-convlora: training"]
    assert len(training) == 1 and training[0]["closed"]
    assert training[0]["totals"][-1] == STEPS and training[0]["counts"][-1] == STEPS
    assert dock.view.progress.format().startswith("done · step")
    assert "left" not in dock.view.progress.text()
    dock.predict_image.refresh("cells")
    dock.predict()
    _wait_idle(dock, qtbot)
    predicting = [r for r in seen if r["desc"] == "napari-convlora: predicting"]
    assert len(predicting) == 1 and predicting[0]["closed"]
    assert dock.view.progress.format() == "done · %p%"


def test_the_threads_field_says_that_zero_is_automatic(dock):
    threads = dock.data_form.options.threads
    assert threads.value == 0 and threads.label == "CPU threads (0 = automatic)"


def test_the_activity_entry_ends_when_the_dock_is_destroyed_mid_job(dock, qtbot):
    """The dock's children are deleted before its ``destroyed`` signal: the entry is closed by a plain callable."""
    dock.data_form.length.setValue(100_000)
    dock.train()
    qtbot.waitUntil(lambda: dock.events_seen.count("step") >= 1, timeout=60_000)
    view, compute = dock.view, dock.compute
    assert view.activity is not None
    dock.destroyed.emit()  # what Qt emits when the dock goes (it also stops the job: training saves)
    assert view.activity is None
    qtbot.waitUntil(lambda: not compute.busy, timeout=60_000)
