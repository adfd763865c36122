"""The learning-rate warm-up of self-training: WeSAM's 250 steps, at most half the run (no torch needed)."""

from __future__ import annotations

import pytest

from napari_convlora.config.self_training import SelfTrainingRecipe


def test_the_default_run_keeps_wesams_warm_up_exactly():
    """A run of 500 steps (the default) or more warms up over WeSAM's 250 steps, the schedule unchanged to the bit."""
    for recipe in (SelfTrainingRecipe(), SelfTrainingRecipe(steps=2000)):
        assert recipe.effective_warmup_steps == 250 and recipe.for_new_run() == recipe
        assert all(recipe.lr_factor(step) == min(1.0, step / 250) for step in range(recipe.steps + 1))


@pytest.mark.parametrize("steps, warmup", [(499, 249), (100, 50), (7, 3), (2, 1), (1, 0)])
def test_a_run_shorter_than_twice_the_warm_up_warms_up_over_half_of_it(steps, warmup):
    """WeSAM's 250-step warm-up would leave a shorter run at a fraction of its learning rate to its end: the warm-up
    is at most half the run, so that every run makes at least half its steps at the full learning rate."""
    asked = SelfTrainingRecipe(steps=steps)
    recipe = asked.for_new_run()
    assert asked.warmup_steps == 250 and asked.effective_warmup_steps == warmup and recipe.warmup_steps == warmup
    factors = [recipe.lr_factor(step) for step in range(steps)]  # step k + 1 is made at lr * lr_factor(k)
    assert factors == [min(1.0, k / warmup) if warmup else 1.0 for k in range(steps)]
    assert factors.count(1.0) >= steps - steps // 2 and factors[-1] == 1.0
    assert SelfTrainingRecipe(steps=steps, warmup_steps=0).lr_factor(0) == 1.0  # no warm-up asked: none

