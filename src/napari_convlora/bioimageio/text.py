"""The words of a BioImage Model Zoo package: its README, default name and description, class names and
citations (``bioimageio/export.py`` writes the package)."""

from __future__ import annotations

import torch

from ..modeling import AdaptedSAM

#: Smallest input side the package declares (any size from there on runs: the forward tiles and pads).
MIN_SIDE = 16

SAM_DOI = "10.48550/arXiv.2304.02643"
CONV_LORA_DOI = "10.48550/arXiv.2401.17868"
HQ_SAM_DOI = "10.48550/arXiv.2306.01567"
SAMED_DOI = "10.48550/arXiv.2304.13785"


def citations(config) -> list[tuple[str, str]]:
    """(text, DOI) of the papers a model rests on: SAM, Conv-LoRA, HQ-SAM when its head uses HQ, SAMed when its
    head has one token per class."""
    cited = [("Kirillov et al., Segment Anything, ICCV 2023", SAM_DOI),
             ("Zhong et al., Convolution Meets LoRA: Parameter Efficient Finetuning for Segment Anything Model, "
              "ICLR 2024", CONV_LORA_DOI)]
    if config.head.uses_hq:
        cited.append(("Ke et al., Segment Anything in High Quality, NeurIPS 2023", HQ_SAM_DOI))
    if config.head.per_class:
        cited.append(("Zhang and Liu, Customized Segment Anything Model for Medical Image Segmentation, arXiv 2023",
                      SAMED_DOI))
    return cited


def class_names(model: AdaptedSAM) -> list[str]:
    """One name per class (the model's, or ``class_0`` ...), unique, as the output's channel names."""
    head = model.config.head
    names = list(head.class_names or [f"class_{i}" for i in range(head.num_classes)])
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def readme(model: AdaptedSAM, crop_shape: tuple[int, ...]) -> str:
    config = model.config
    head, spec, adapter = config.head, config.input, config.adapter
    torch_version, version = versions()
    channels = ("all of the image's channels (1 to 3)" if spec.channels is None
                else f"channels {', '.join(map(str, spec.channels))} of the original image, in this order")
    slots = ("one channel is repeated into R, G and B; two go into R and G; three into R, G and B"
             if spec.rgb_slots is None else ", ".join(f"input channel {i} into {'RGB'[slot]}"
                                                      for i, slot in enumerate(spec.rgb_slots)))
    rows = "\n".join(f"| {i} | {name} | {value} |" for i, (name, value)
                     in enumerate(zip(class_names(model), head.class_values)))
    method = {"conv_lora": "Conv-LoRA", "lora": "LoRA"}.get(adapter.method)
    adapter_text = (f"{method} adapters of rank {adapter.rank} on {', '.join(adapter.targets)}" if method else
                    "no encoder adapter (only SAM's mask decoder was fine-tuned)")
    if adapter.method == "conv_lora":
        adapter_text += f" with {adapter.num_experts} scale experts (top-{adapter.top_k})"
    if adapter.method == "hq":
        adapter_text = "no encoder adapter (SAM frozen; HQ-SAM's parts and the head's tokens were trained)"
    hq_text = {"off": "", "sam+hq": " With HQ-SAM's output token and feature fusion: SAM's mask plus the HQ mask.",
               "hq": " With HQ-SAM's output token and feature fusion: the HQ mask alone."}[head.hq]
    if head.detail:
        hq_text += (" The masks are corrected at the input's full resolution by a detail head (from the encoder's "
                    "features and the image) instead of being upsampled from a quarter of it.")
    cited = "\n".join(f"- {text}, doi:{doi}" for text, doi in citations(config))
    base = config.base_checkpoint
    base_text = f"`{base.file_name}` (sha256 `{base.sha256}`)" if base else "a SAM built in memory (no file)"
    tokens = f"{head.num_mask_tokens} mask token{'s' if head.num_mask_tokens > 1 else ''}"
    kind = "binary" if head.binary else "multi-class, one token per class (SAMed)" if head.per_class else \
        "multi-class, tokens matched to classes with a class head (Conv-LoRA)"
    return f"""# {default_name(model)}

Semantic segmentation into {head.num_classes} classes with Segment Anything (SAM, image encoder
`{config.base.model_type or 'custom'}`), fine-tuned by napari-convlora {version}.
Encoder: {adapter_text}. Head: prompt-free, {kind}, {tokens}.{hq_text}
Base SAM checkpoint: {base_text}.
The package is self-contained: `weights.pt` holds the base SAM, the adapters and the head.

## Classes (training data)

Output channel *i* is the probability of class *i*. The training labels were read in `{head.label_mode}`
mode (background label value {head.background_value}).

| channel | class | label value in napari-convlora |
|---|---|---|
{rows}

## Input

One 2D image, axes `batch, channel, y, x`, float32 raw intensities, any `y, x` of at least {MIN_SIDE} pixels.
Channels: {channels}.
Stacks and time series: one plane at a time.

Preprocessing (in `rdf.yaml`, done by the consumer over the whole image): per channel, the
{spec.percentiles[0]} and {spec.percentiles[1]} intensity percentiles map to 0 and 1 (`scale_range`),
then values are clipped to 0..1 (`clip`). napari-convlora computes the percentiles over a whole stack at once
and uses a channel's minimum..maximum when its two percentiles coincide; the package computes them per plane.

The model itself (`bioimageio_model.py`) then:

- puts the channels into SAM's RGB input: {slots};
- scales them to 0..255 and resizes the image by {spec.rescale} (the model's `rescale`);
- predicts overlapping tiles of {config.input_size} x {config.input_size} pixels and blends them (SAM's pixel
  normalisation, mean {list(config.pixel_mean)} and std {list(config.pixel_std)}, is inside the model);
- resizes the probabilities back to the input's size.

## Output

Axes `batch, channel, y, x`: float32 class probabilities (summing to 1 over the channels), the input's size.
Labels: the most probable class per pixel (`argmax` over the channels), in napari-convlora mapped to the label
values above.

## How to run

- bioimageio.core: `bioimageio predict model.zip --inputs image.tif`, or `bioimageio.core.predict` in Python.
- napari-convlora: the model file this package was exported from predicts the same probabilities
  (`napari-convlora predict --model <model file> --image image.tif`, or the napari-convlora dock in napari).

Environment: `environment.yaml` (pytorch, segment-anything, napari-convlora); exported with pytorch
{torch_version}.

## Validation

The test input is a {crop_shape[0]} x {crop_shape[1]} crop of a real image; the test output is what
napari-convlora predicted for it. To validate the model on unseen data, label a few held-out images and run
`napari-convlora evaluate --model <model file> --image <image> --labels <labels>` (per-class IoU and Dice).

## Limitations

Conv-LoRA's data-dependent expert routing cannot be traced to TorchScript: the package has
`pytorch_state_dict` weights only and needs napari-convlora installed. Predicting in blocks gives the result
of the whole image only up to the tile blending at block borders.

## Citations

{cited}
- napari-convlora {version}
"""


# ---- the description ---------------------------------------------------------------------------------------
def default_name(model: AdaptedSAM) -> str:
    config = model.config
    method = {"conv_lora": "Conv-LoRA", "lora": "LoRA", "decoder": "decoder-tuned", "hq": "HQ-tuned"}.get(
        config.adapter.method, config.adapter.method)
    if config.head.uses_hq and config.adapter.method != "hq":
        method += " + HQ"
    return f"{method} SAM {config.base.model_type or 'custom'} ({config.head.num_classes} classes)"


def default_description(model: AdaptedSAM) -> str:
    head = model.config.head
    names = ", ".join(class_names(model))
    return (f"Segment Anything fine-tuned with napari-convlora for semantic segmentation into {head.num_classes} "
            f"classes ({names}); outputs class probabilities.")[:512]


def versions() -> tuple[str, str]:
    """(torch's version without a local suffix, napari-convlora's version)."""
    from ..checkpoints.model_files import package_version

    return torch.__version__.split("+")[0], package_version()
