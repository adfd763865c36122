"""What a fine-tuned model is: base geometry, encoder adapter, head, input spec and base checkpoint.

:class:`ModelConfig` is stored in the record of every file this project writes, so that a file alone says
how to rebuild its model and how to prepare images for it. No torch, no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..constants import PATCH_SIZE, SAM_PIXEL_MEAN, SAM_PIXEL_STD
from ..errors import ConfigError
from .choices import HQ_MODES, LABEL_MODES, METHODS, MULTICLASS_HEADS, NO_ENCODER_ADAPTER, QKV_SLICES, WEAK_LABEL_KINDS
from .instances import InstanceConfig
from .records import ADDED_LATER
from .sam import SamArchitecture


@dataclass
class AdapterConfig:
    """Which encoder adapter, where, and its hyper-parameters (defaults: the Conv-LoRA reference).

    method: ``"conv_lora"`` (LoRA with a mixture of scale experts in the bottleneck), ``"lora"``,
        ``"decoder"`` (no encoder adapter: only the mask decoder trains; a baseline), or ``"hq"`` (HQ-SAM's
        regime: no encoder adapter and SAM's decoder frozen; needs the head's ``hq`` on).
    targets: suffixes of the encoder Linear layers to wrap (``"attn.qkv"``, ``"attn.proj"``,
        ``"mlp.lin1"``, ``"mlp.lin2"``); a name matches when it equals or ends with ``"." + target``.
    scales: the experts' up-sampling factors; None: 1, 2, ..., num_experts.
    weight_by_gate: multiply each expert's output by its gate value. The reference does not, so its
        gate learns only from the balance loss; with True it also learns from the task loss.
    qkv_slices: None (default): LoRA on the whole output of each target. A tuple of ``"q"``, ``"k"``, ``"v"``
        (method ``"lora"``, fused ``attn.qkv`` targets only): one separate LoRA branch per named slice of the
        fused qkv output, the others untouched; WeSAM's adapter uses ``("q", "v")`` (:func:`wesam_adapter`).
    """

    method: str = "conv_lora"
    rank: int = 3
    alpha: float = 32.0
    dropout: float = 0.0
    num_experts: int = 8
    scales: tuple[float, ...] | None = None
    top_k: int = 1
    weight_by_gate: bool = False
    noisy_gating: bool = True
    balance_coef: float = 0.01
    targets: tuple[str, ...] = ("attn.qkv",)
    qkv_slices: tuple[str, ...] | None = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown adapter method {self.method!r}; expected one of {METHODS}")
        self.targets = tuple(self.targets)
        if self.qkv_slices is not None:
            self.qkv_slices = _checked_qkv_slices(tuple(self.qkv_slices), self.method, self.targets)
        if self.scales is not None:
            self.scales = tuple(float(s) for s in self.scales)
            if len(self.scales) != self.num_experts:
                raise ConfigError(f"{len(self.scales)} scales given for {self.num_experts} experts")
            if min(self.scales) <= 0:
                raise ConfigError(f"expert scales must be positive, got {self.scales}")
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if self.num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def has_encoder_adapter(self) -> bool:
        return self.method not in NO_ENCODER_ADAPTER

    @property
    def expert_scales(self) -> tuple[float, ...]:
        return self.scales if self.scales is not None else tuple(float(i + 1) for i in range(self.num_experts))


def _checked_qkv_slices(slices: tuple[str, ...], method: str, targets: tuple[str, ...]) -> tuple[str, ...]:
    """``slices`` in q, k, v order, or ConfigError when they, the method or the targets do not allow it."""
    if method != "lora":
        raise ConfigError(f"qkv_slices needs method 'lora', got {method!r}")
    if not slices or not set(slices) <= set(QKV_SLICES) or len(set(slices)) != len(slices):
        raise ConfigError(f"qkv_slices must be distinct names among {QKV_SLICES}, got {slices}")
    if not all(t.rsplit(".", 1)[-1] == "qkv" for t in targets):
        raise ConfigError(f"qkv_slices applies to fused qkv layers only ('attn.qkv'), got targets {targets}")
    return tuple(s for s in QKV_SLICES if s in slices)


def wesam_adapter() -> AdapterConfig:
    """WeSAM's default adapter (METHODS.md 3.1): LoRA rank 4, scale 1 (alpha 4), no dropout, on the q and v
    slices of every encoder block's fused ``attn.qkv``: ``4 d r`` parameters per block (147,456 for ViT-B)."""
    return AdapterConfig(method="lora", rank=4, alpha=4.0, dropout=0.0, targets=("attn.qkv",), qkv_slices=("q", "v"))


@dataclass
class HeadConfig:
    """The prompt-free segmentation head and the labels it was trained on.

    num_classes counts background as class 0 (binary = 2). A binary head has one mask token. A multi-class head
    is ``multiclass``: ``"matched"`` (Conv-LoRA's): ``num_mask_tokens`` tokens (default ``2 * num_classes``) and a
    class head, tokens matched to classes in the loss; ``"per_class"`` (SAMed's): exactly ``num_classes`` tokens,
    token k always class k, no class head. Binary heads ignore ``multiclass``.
    class_values: the label value written into napari Labels for each class (default 0..K-1).
    label_mode and background_value: how the training labels were read (see ``data.LabelEncoding``), so that
    ground truth for evaluation is read the same way.
    hq: HQ-SAM's fusion on the head (METHODS.md 2): ``"off"``; ``"sam+hq"``: every mask token's mask from SAM's
        features plus its mask from the fused HQ features (HQ-SAM's ``hq_token_only=False``, its "error
        correction"); ``"hq"``: the HQ mask alone (``hq_token_only=True``). The promptable path follows it too.
    detail: the masks are corrected at the input's full resolution by a detail head
        (``modeling/detail_head.py``) instead of being upsampled from a quarter of it; models saved before the
        field existed have none.
    detail_context: the detail head also reads each pixel's surroundings at the image's own resolution (a small
        pyramid on its image stem, ``full_resolution.LocalContext``; issue 22: tiny lesions); detail heads saved
        before the field existed have none.
    """

    num_classes: int = 2
    num_mask_tokens: int | None = None
    class_names: tuple[str, ...] | None = None
    class_values: tuple[int, ...] | None = None
    label_mode: str = "dense"
    background_value: int = 0
    hq: str = field(default="off", metadata=ADDED_LATER)
    multiclass: str = field(default="matched", metadata=ADDED_LATER)
    detail: bool = field(default=False, metadata=ADDED_LATER)
    detail_context: bool = field(default=False, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if self.hq not in HQ_MODES:
            raise ConfigError(f"unknown HQ mode {self.hq!r}; expected one of {HQ_MODES}")
        if self.multiclass not in MULTICLASS_HEADS:
            raise ConfigError(f"unknown multi-class head {self.multiclass!r}; expected one of {MULTICLASS_HEADS}")
        if not 2 <= self.num_classes <= 256:
            raise ConfigError(f"num_classes (background included) must be in 2..256, got {self.num_classes}")
        if self.label_mode not in LABEL_MODES:
            raise ConfigError(f"unknown label mode {self.label_mode!r}; expected one of {LABEL_MODES}")
        if self.num_mask_tokens is None:
            self.num_mask_tokens = 1 if self.binary else self.num_classes if self.per_class else 2 * self.num_classes
        if self.binary and self.num_mask_tokens != 1:
            raise ConfigError("a binary head (num_classes=2) has exactly one mask token")
        if self.per_class and self.num_mask_tokens != self.num_classes:
            raise ConfigError(f"a per-class head has one mask token per class ({self.num_classes}), got "
                              f"num_mask_tokens={self.num_mask_tokens}")
        if not self.binary and self.num_mask_tokens < self.num_classes:
            raise ConfigError(
                f"num_mask_tokens ({self.num_mask_tokens}) must be >= num_classes ({self.num_classes}) "
                "so that every class present can be matched to a token"
            )
        if self.class_values is None:
            self.class_values = tuple(range(self.num_classes))
        self.class_values = tuple(int(v) for v in self.class_values)
        if self.class_names is not None:
            self.class_names = tuple(str(n) for n in self.class_names)
        for name in ("class_names", "class_values"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_classes:
                raise ConfigError(f"{len(value)} {name} given for {self.num_classes} classes")

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def per_class(self) -> bool:
        """A multi-class head whose token k is always class k (no class head, no matching)."""
        return not self.binary and self.multiclass == "per_class"

    @property
    def has_class_head(self) -> bool:
        """A multi-class head with matched tokens and a ``Linear(D, K+1)`` class head."""
        return not self.binary and self.multiclass == "matched"

    @property
    def uses_hq(self) -> bool:
        return self.hq != "off"


@dataclass
class InputSpec:
    """How a raw image becomes the RGB planes SAM sees: everything prediction must repeat from training.

    channels: which channels of a multichannel image to use (1 to 3 indices; default: all, at most 3).
    rgb_slots: the RGB slot (0, 1, 2) each used channel goes into. Default: 1 channel -> repeated into all
        three; 2 channels -> red and green; 3 -> red, green, blue.
    percentiles: (low, high) intensity percentiles of the whole image mapped to 0 and 255.
    rescale: resize factor applied before SAM sees the image (0.5 when objects are twice as large as SAM
        expects); predictions are resized back.
    """

    channels: tuple[int, ...] | None = None
    rgb_slots: tuple[int, ...] | None = None
    percentiles: tuple[float, float] = (1.0, 99.8)
    rescale: float = 1.0

    def __post_init__(self) -> None:
        if self.channels is not None:
            self.channels = tuple(int(c) for c in self.channels)
            if not 1 <= len(self.channels) <= 3:
                raise ConfigError(f"choose 1 to 3 channels, got channels={self.channels}")
            if len(set(self.channels)) != len(self.channels) or min(self.channels) < 0:
                raise ConfigError(f"channels must be distinct indices >= 0, got {self.channels}")
        if self.rgb_slots is not None:
            self.rgb_slots = tuple(int(s) for s in self.rgb_slots)
            slots = self.rgb_slots
            if not slots or not set(slots) <= {0, 1, 2} or len(set(slots)) != len(slots):
                raise ConfigError(f"rgb_slots must be distinct values among 0, 1, 2; got {slots}")
            if self.channels is not None and len(slots) != len(self.channels):
                raise ConfigError(f"rgb_slots={slots} names {len(slots)} slot(s) for {len(self.channels)} channel(s)")
        self.percentiles = (float(self.percentiles[0]), float(self.percentiles[1]))
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        self.rescale = float(self.rescale)
        if not 0.0 < self.rescale <= 16.0:
            raise ConfigError(f"rescale must be in (0, 16], got {self.rescale}")


@dataclass(frozen=True)
class BaseCheckpoint:
    """The SAM checkpoint a model was built on, as an adapter file records it."""

    file_name: str
    sha256: str


@dataclass
class PromptableAdaptation:
    """What a model file records when its encoder was adapted through SAM's promptable decoder.

    method: ``"wesam"``. weak_labels: the kinds used (``WEAK_LABEL_KINDS``). steps: optimizer steps made.
    before, after: prompt mIoU and per-kind scores on the evaluation labels before and after adaptation (None
    without evaluation labels).
    """

    method: str = "wesam"
    weak_labels: tuple[str, ...] = ()
    steps: int = 0
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.weak_labels = tuple(self.weak_labels)
        unknown = set(self.weak_labels) - set(WEAK_LABEL_KINDS)
        if unknown:
            raise ConfigError(f"unknown weak label kinds {sorted(unknown)}; expected some of {WEAK_LABEL_KINDS}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a fine-tuned model on top of its base SAM, and to feed it images.

    base_checkpoint: the base's file name and sha256, taken once when the base was loaded; None for a SAM
        built in memory (such a model can be saved as a bundle, not as an adapter).
    pixel_mean, pixel_std: SAM's normalisation of RGB values in 0..255, applied inside the model.
    instances: the instance head's post-processing when the model has an instance head (foreground, centre and
        depth maps next to the class masks; ``config/instances.py``); None for none.
    promptable: set when the encoder was adapted through SAM's promptable decoder from weak labels (WeSAM): then
        only the adapters train and SAM's decoder stays as loaded; None for prompt-free fine-tuning.
    """

    base: SamArchitecture
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    input_size: int = 1024
    input: InputSpec = field(default_factory=InputSpec)
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    base_checkpoint: BaseCheckpoint | None = None
    promptable: PromptableAdaptation | None = field(default=None, metadata=ADDED_LATER)
    instances: InstanceConfig | None = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        check_input_size(self.input_size)
        if self.adapter.method == "hq" and not self.head.uses_hq:
            raise ConfigError("method 'hq' trains HQ-SAM's parts only: the head's hq must be 'sam+hq' or 'hq'")
        if self.instances is not None and not self.head.binary:
            raise ConfigError(f"an instance head separates the objects of one class: the head has "
                              f"{self.head.num_classes} classes")
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ConfigError(f"pixel_mean and pixel_std need 3 values, std > 0; got {self.pixel_mean}, {self.pixel_std}")


#: Smallest input side: 4 x 4 image-embedding tokens.
MIN_INPUT_SIZE = 64


def check_input_size(input_size: int) -> int:
    """``input_size`` if SAM can take it (a multiple of its 16 px patches, at least 64), else ValueError."""
    if int(input_size) != input_size or input_size % PATCH_SIZE or input_size < MIN_INPUT_SIZE:
        raise ConfigError(
            f"input size must be a multiple of {PATCH_SIZE} and at least {MIN_INPUT_SIZE} px, got {input_size}"
        )
    return int(input_size)
