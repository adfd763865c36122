"""The per-class head is the default for semantic labels (issue 22, item 4), and runs saved before it existed still
resume with the matched head they were trained with."""

from __future__ import annotations

from napari_convlora.config import TrainRecipe, from_record, to_record


def test_new_recipes_use_the_per_class_head_and_old_ones_keep_matched():
    assert TrainRecipe().multiclass_head == "per_class"
    record = to_record(TrainRecipe())
    del record["multiclass_head"]  # a run saved by version 0.3.0
    assert from_record(TrainRecipe, record, "old.training.pt").multiclass_head == "matched"
    record["multiclass_head"] = "per_class"
    assert from_record(TrainRecipe, record, "new.training.pt").multiclass_head == "per_class"
