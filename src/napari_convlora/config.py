"""One tree of JSON-serialisable, versioned dataclasses describing a fine-tuned model.

``ModelConfig`` = base SAM geometry + adapter + head + input size + normalisation. It is stored in
the metadata of every file this project writes, so a file alone says how to rebuild its model.
Unknown keys (from a newer version) are dropped with a warning; missing required keys raise.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from .constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from .sam_architecture import SamArchitecture

CONFIG_VERSION = 1
METHODS = ("conv_lora", "lora", "decoder")

T = TypeVar("T")


def _from_dict(cls: type[T], d: Mapping[str, Any], what: str) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        warnings.warn(f"{what}: ignoring unknown keys {sorted(unknown)} (written by a newer version?)", stacklevel=3)
    required = {
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if required - set(d):
        raise ValueError(f"{what}: missing keys {sorted(required - set(d))}")
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class AdapterConfig:
    """Which encoder adapter, where, and its hyper-parameters (defaults: the Conv-LoRA reference).

    method: ``"conv_lora"`` (LoRA with a mixture of scale experts in the bottleneck), ``"lora"``,
        or ``"decoder"`` (no encoder adapter: only the mask decoder trains; a baseline).
    targets: suffixes of the encoder Linear layers to wrap (``"attn.qkv"``, ``"attn.proj"``,
        ``"mlp.lin1"``, ``"mlp.lin2"``); a name matches when it equals or ends with ``"." + target``.
    weight_by_gate: multiply each expert's output by its gate value. The reference does not, so its
        gate learns only from the balance loss; with True it also learns from the task loss.
    """

    method: str = "conv_lora"
    rank: int = 3
    alpha: float = 32.0
    dropout: float = 0.0
    num_experts: int = 8
    scales: tuple[float, ...] | None = None  # None: 1, 2, ..., num_experts
    top_k: int = 1
    weight_by_gate: bool = False
    noisy_gating: bool = True
    balance_coef: float = 0.01
    targets: tuple[str, ...] = ("attn.qkv",)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown adapter method {self.method!r}; expected one of {METHODS}")
        self.targets = tuple(self.targets)
        if self.scales is not None:
            self.scales = tuple(float(s) for s in self.scales)
            if len(self.scales) != self.num_experts:
                raise ValueError(f"{len(self.scales)} scales given for {self.num_experts} experts")
            if min(self.scales) <= 0:
                raise ValueError(f"expert scales must be positive, got {self.scales}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def expert_scales(self) -> tuple[float, ...]:
        return self.scales if self.scales is not None else tuple(float(i + 1) for i in range(self.num_experts))


@dataclass
class HeadConfig:
    """The prompt-free segmentation head.

    num_classes counts background as class 0 (binary = 2). A binary head has one mask token;
    a multi-class head has ``num_mask_tokens`` tokens (default ``2 * num_classes``) and a class head.
    class_values maps class index -> label value written into napari Labels (default 0..K-1).
    label_mode and background_value say how the training labels were read (see ``data.LabelEncoding``),
    so that ground truth for evaluation is read the same way.
    """

    num_classes: int = 2
    num_mask_tokens: int | None = None
    class_names: tuple[str, ...] | None = None
    class_values: tuple[int, ...] | None = None
    label_mode: str = "dense"
    background_value: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= 256:
            raise ValueError(f"num_classes (background included) must be in 2..256, got {self.num_classes}")
        if self.num_mask_tokens is None:
            self.num_mask_tokens = 1 if self.binary else 2 * self.num_classes
        if self.binary and self.num_mask_tokens != 1:
            raise ValueError("a binary head (num_classes=2) has exactly one mask token")
        if not self.binary and self.num_mask_tokens < self.num_classes:
            raise ValueError(
                f"num_mask_tokens ({self.num_mask_tokens}) must be >= num_classes ({self.num_classes}) "
                "so that every class present can be matched to a token"
            )
        for name in ("class_names", "class_values"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
                if len(value) != self.num_classes:
                    raise ValueError(f"{len(value)} {name} given for {self.num_classes} classes")

    @property
    def binary(self) -> bool:
        return self.num_classes == 2


@dataclass
class Normalisation:
    """How raw images become SAM input: percentiles to 0..255, then SAM's mean/std (applied inside the model)."""

    percentiles: tuple[float, float] = (1.0, 99.8)
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    rescale: float = 1.0

    def __post_init__(self) -> None:
        self.percentiles = tuple(self.percentiles)
        self.pixel_mean = tuple(self.pixel_mean)
        self.pixel_std = tuple(self.pixel_std)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a fine-tuned model on top of its base SAM."""

    base: SamArchitecture
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    input_size: int = 1024
    normalisation: Normalisation = field(default_factory=Normalisation)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "base": self.base.to_dict(),
            "adapter": dataclasses.asdict(self.adapter),
            "head": dataclasses.asdict(self.head),
            "input_size": self.input_size,
            "normalisation": dataclasses.asdict(self.normalisation),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        version = d.get("version")
        if version is None or version > CONFIG_VERSION:
            raise ValueError(f"model config version {version!r} is not supported (this package reads <= {CONFIG_VERSION})")
        for key in ("base", "adapter", "head", "input_size"):
            if key not in d:
                raise ValueError(f"model config lacks '{key}'")
        return cls(
            base=SamArchitecture.from_dict(d["base"]),
            adapter=_from_dict(AdapterConfig, d["adapter"], "adapter config"),
            head=_from_dict(HeadConfig, d["head"], "head config"),
            input_size=int(d["input_size"]),
            normalisation=_from_dict(Normalisation, d.get("normalisation", {}), "normalisation"),
            version=version,
        )
