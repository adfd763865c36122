"""Self-training from weak labels (WeSAM, METHODS.md 3): the recipe of a run. No torch.

:class:`SelfTrainingRecipe` decides what a run computes (saved with the run); what the adapted model records
(:class:`~.model.PromptableAdaptation`) is part of its :class:`~.model.ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from .model import AdapterConfig, InputSpec, check_input_size, wesam_adapter


@dataclass
class SelfTrainingRecipe:
    """Everything that decides what a WeSAM run computes. Defaults follow WeSAM's released code (METHODS.md 3.5):
    LoRA rank 4 on q and v, Adam with coupled weight decay 1e-4, lr 1e-4, linear warm-up over 250 steps (at most
    half the run: :meth:`for_new_run`), at most 40 prompted objects per step, 5 positive and 5
    negative points drawn afresh in coarse masks at every step.

    adapter: the encoder adapter (default WeSAM's; Conv-LoRA or LoRA with the plugin's defaults work too).
    input_size: SAM's input side; training crops are this large (objects keep their pixel size).
    input: how images are normalised (the plugin's percentiles; WeSAM feeds unnormalised 0..1 images to a SAM
        trained on normalised ones, which the plugin does not copy).
    reference_quirks: reproduce the released code's loss quirk (``self_training.losses``); False: the intended
        formulas.
    grad_clip: the largest gradient norm, or None (default) for no clipping, as WeSAM's released code trains (runs
        saved before napari-convlora 0.3 clipped at 1.0, and resume with it).
    """

    adapter: AdapterConfig = field(default_factory=wesam_adapter)
    input_size: int = 1024
    input: InputSpec = field(default_factory=InputSpec)
    steps: int = 500
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 250
    grad_clip: float | None = None
    max_objects: int = 40
    positive_points: int = 5
    negative_points: int = 5
    reference_quirks: bool = False
    val_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_input_size(self.input_size)
        if self.adapter.method not in ("lora", "conv_lora"):
            raise ConfigError(f"self-training adapts the encoder: method 'lora' or 'conv_lora', not "
                              f"{self.adapter.method!r}")
        for name in ("steps", "max_objects", "positive_points"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.negative_points < 0 or self.warmup_steps < 0:
            raise ConfigError("negative_points and warmup_steps must be >= 0")
        if not self.lr > 0 or not math.isfinite(self.lr) or self.weight_decay < 0:
            raise ConfigError(f"need lr > 0 and weight_decay >= 0; got {self.lr}, {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 (or None: no clipping), got {self.grad_clip}")
        if self.val_every is not None and self.val_every < 1:
            raise ConfigError(f"val_every must be >= 1, got {self.val_every}")

    @property
    def effective_warmup_steps(self) -> int:
        """The warm-up a new run of ``steps`` makes: ``warmup_steps``, but at most half the run (``steps // 2``), so
        that every run makes at least half its steps at the full learning rate. WeSAM's 250 steps stay for runs of
        500 steps (the default) or more; a shorter run would otherwise end partway up the ramp (a 100-step run at
        40 % of ``lr``)."""
        return min(self.warmup_steps, self.steps // 2)

    def for_new_run(self) -> SelfTrainingRecipe:
        """The recipe a new run saves and follows: ``warmup_steps`` set to :attr:`effective_warmup_steps`. A resumed
        run keeps the saved recipe as it is, so it follows its schedule exactly, also when continued for more steps
        (and runs saved before the warm-up was scaled resume with theirs)."""
        return dataclasses.replace(self, warmup_steps=self.effective_warmup_steps)

    def lr_factor(self, step: int) -> float:
        """WeSAM's schedule: linear warm-up from 0 over ``warmup_steps``, then constant (its decays start at step
        60,000, beyond any run here). Step ``k + 1`` is made at ``lr * lr_factor(k)``."""
        return min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
