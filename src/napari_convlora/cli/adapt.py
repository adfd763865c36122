"""``napari-convlora adapt``: WeSAM's self-training from weak labels saved by napari (Shapes and Points layers as
CSV) or a coarse label image, on the command line.

Each ``--image`` takes its weak labels from the ``--boxes``, ``--points`` and ``--coarse`` files given in the same
position (each option given once per image, or not at all; ``-`` stands for none for that image), and optionally
``--eval-labels`` (dense instance labels, for prompt mIoU only: the losses never read them).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from typing import Any

from ..constants import STACK_IOU
from ..errors import ConfigError

WEAK_OPTIONS = ("boxes", "points", "coarse", "eval_labels")


def _per_image(args: argparse.Namespace, option: str) -> list[str | None]:
    values = getattr(args, option)
    flag = "--" + option.replace("_", "-")
    if not values:
        return [None] * len(args.image)
    if len(values) != len(args.image):
        raise ConfigError(f"{len(values)} {flag} for {len(args.image)} --image: give it once per image ('-' for none)")
    return [None if v == "-" else v for v in values]


def _weak_labels(image_shape: tuple[int, ...], boxes: str | None, points: str | None, coarse: str | None,
                 coarse_masks: bool) -> Any:
    from ..io.images import read_image
    from ..weak import combine_weak_labels, weak_labels_from_coarse_labels, weak_labels_from_csv

    parts = []
    if boxes:
        parts.append(weak_labels_from_csv(boxes, image_shape, kind="shapes", coarse_masks=coarse_masks))
    if points:
        parts.append(weak_labels_from_csv(points, image_shape, kind="points"))
    if coarse:
        parts.append(weak_labels_from_coarse_labels(read_image(coarse), image_shape, layer=coarse))
    return combine_weak_labels(parts)


def cmd_adapt(args: argparse.Namespace) -> int:
    from .options import check_outputs as _check_outputs, image_layout as _layout
    from .options import numbered as _numbered, run_options as _run_options
    from ..config import AdapterConfig, InputSpec
    from ..config.self_training import SelfTrainingRecipe
    from ..data import spatial_shape
    from ..io.images import read_image
    from .progress import TerminalProgress
    from ..self_training import WeakPair, prepare_weak_data, self_train

    if args.steps is not None and args.steps < 1:  # 0 is a number of steps, not "not given"
        raise ConfigError(f"--steps {args.steps}: give at least 1 optimizer step (or leave --steps out for "
                          f"{SelfTrainingRecipe().steps}, or the saved run's with --resume)")
    columns = {option: _per_image(args, option) for option in WEAK_OPTIONS}
    for i, image in enumerate(args.image):
        if not any(columns[o][i] for o in ("boxes", "points", "coarse")):
            raise ConfigError(f"--image {image} has no weak labels: give --boxes, --points or --coarse for it")
    from ..checkpoints.builtin import describe_builtin, resolve_base

    if args.checkpoint is None and not args.resume:
        print(f"base model: {describe_builtin()} (--checkpoint builtin; give --checkpoint FILE for another)",
              file=sys.stderr)
    args.checkpoint = str(resolve_base(args.checkpoint))
    inputs = {"--checkpoint": args.checkpoint, **_numbered("--image", args.image)}  # --out may be --resume
    for option, values in columns.items():
        inputs.update(_numbered("--" + option.replace("_", "-"), [v for v in values if v]))
    from ..checkpoints.training_state import state_path

    _check_outputs({"--out": args.out, "the training state of --out": state_path(args.out)}, inputs)
    base_notes: list[str] = []  # what a new run takes from its base
    if args.resume:  # the saved recipe continues (for longer with a larger --steps)
        from ..self_training.loop import resume_self_training_recipe

        saved = resume_self_training_recipe(args.resume)
        recipe = dataclasses.replace(saved, steps=saved.steps if args.steps is None else args.steps)
        print(f"resuming {args.resume} with its saved recipe ({recipe.steps} steps)", file=sys.stderr)
    else:
        adapter = {"wesam": None, "lora": AdapterConfig(method="lora"), "conv_lora": AdapterConfig(method="conv_lora")}
        steps = SelfTrainingRecipe().steps if args.steps is None else args.steps
        from ..training.recipes import BASE_FIELDS, base_defaults, defaults_notes

        defaults = base_defaults(args.checkpoint, _run_options(args).device, self_training=True)  # read once
        given = {name: getattr(args, name) for name in BASE_FIELDS}
        # said once the data are read, so that a refusal stays one line
        base_notes = defaults_notes(defaults, given, {"input_size": "--input-size", "lr": "--lr"})
        chosen = {name: given[name] if given[name] is not None else value for name, (value, _) in defaults.items()}
        recipe_options = dict(**chosen, steps=steps,
                              seed=args.seed, reference_quirks=args.reference_quirks, val_every=args.val_every,
                              grad_clip=args.grad_clip,
                              input=InputSpec(channels=tuple(int(c) for c in args.channels.split(","))
                                              if args.channels else None))
        if adapter[args.method] is not None:
            recipe_options["adapter"] = adapter[args.method]
        recipe = SelfTrainingRecipe(**recipe_options)
    layout = _layout(args)
    pairs = []
    for i, path in enumerate(args.image):
        image = read_image(path)
        shape = spatial_shape(image, layout)
        weak = _weak_labels(shape, columns["boxes"][i], columns["points"][i], columns["coarse"][i], args.coarse_masks)
        if columns["eval_labels"][i]:
            weak = weak.with_evaluation_labels(read_image(columns["eval_labels"][i]), columns["eval_labels"][i])
        for line in weak.summary().lines():
            print(f"{path}: {line}", file=sys.stderr)
        pairs.append(WeakPair(image, weak, layout, path))
    data = prepare_weak_data(pairs, recipe)
    for note in base_notes:
        print(note, file=sys.stderr)
    stop = threading.Event()
    progress = TerminalProgress()
    try:
        for event in self_train(args.checkpoint, data, args.out, recipe, _run_options(args), stop=stop,
                                resume_from=args.resume):
            progress.show(event)
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted: run again with --resume {args.out} to continue from its last save", file=sys.stderr)
        return 130
    finally:
        progress.close()
    return 0


def add_adapt_parser(sub: Any, add_layout_options: Any, add_run_options: Any) -> None:
    from ..config.self_training import SelfTrainingRecipe

    defaults = SelfTrainingRecipe()
    p = sub.add_parser(
        "adapt", help="adapt SAM's promptable segmentation to your images from weak labels (WeSAM self-training)",
        description="Boxes and points as napari saves Shapes and Points layers (.csv), or a coarse label image; "
                    "each option once per --image in the same order ('-' for none). The adapted model (an adapter "
                    "on --checkpoint) segments prompts better on such images.")
    p.add_argument("--checkpoint", default=None, help="base SAM checkpoint (.pth), or 'builtin' (the built-in small "
                   "SAM; the default)")
    p.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    p.add_argument("--boxes", action="append", default=[], help="a Shapes layer saved as .csv: rectangles are box "
                   "prompts, polygons and ellipses give their boxes")
    p.add_argument("--points", action="append", default=[], help="a Points layer saved as .csv (a 'label' column: "
                   "positive/negative; an 'instance' column groups points into objects)")
    p.add_argument("--coarse", action="append", default=[], help="a coarse label image: one object per label id, "
                   "prompted with its box and points drawn inside it afresh at every step")
    p.add_argument("--eval-labels", action="append", default=[], help="dense instance labels of the image, for "
                   "prompt mIoU before and after (never used by the loss)")
    p.add_argument("--coarse-masks", action="store_true", help="keep the masks of polygons and ellipses: prompt "
                   "them like coarse labels")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--method", default="wesam", choices=("wesam", "lora", "conv_lora"),
                   help="wesam (default): LoRA rank 4 on q and v, as the paper; lora / conv_lora: the plugin's")
    p.add_argument("--input-size", type=int, default=None, help="SAM input side; crops are this large "
                   "(default: the base's own on a GPU, at most 256 on a CPU and 512 on Apple MPS)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {defaults.steps}; with "
                   "--resume the saved run's, more to continue a finished run); the learning rate warms up over "
                   f"WeSAM's {defaults.warmup_steps} steps, or the first half of a run shorter than "
                   f"{2 * defaults.warmup_steps}")
    p.add_argument("--resume", default=None, help="continue the self-training run saved in this adapter file "
                   "(and its .training.pt) exactly, with its own recipe")
    p.add_argument("--lr", type=float, default=None, help=f"default: {defaults.lr:g} (WeSAM's) for SAM's checkpoints, "
                   "1e-3 for small bases such as the built-in one")
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--grad-clip", type=float, default=defaults.grad_clip, metavar="NORM",
                   help="clip the gradient norm at NORM (default: no clipping, as WeSAM's released code)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", default=None, help="channels of a multichannel image to use, e.g. 0,2")
    p.add_argument("--reference-quirks", action="store_true", help="reproduce the released WeSAM code's loss quirk "
                   "(focal alpha and dice smoothing = number of masks) instead of the intended formulas")
    add_layout_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_adapt)


def cmd_segment_prompts(args: argparse.Namespace) -> int:
    from .options import check_outputs as _check_outputs, image_layout as _layout, load_model_from_args
    from ..data import spatial_shape
    from ..io.images import read_image, write_image
    from ..self_training.prompting import EmbeddingCache, segment_weak_labels

    if not (args.boxes or args.points or args.coarse):
        raise ConfigError("give the prompts: --boxes, --points or --coarse")
    _check_outputs({"--out": args.out}, {"--image": args.image, "--model": args.model, "--checkpoint": args.checkpoint,
                                         "--boxes": args.boxes, "--points": args.points, "--coarse": args.coarse})
    model = load_model_from_args(args)
    image = read_image(args.image)
    layout = _layout(args)
    weak = _weak_labels(spatial_shape(image, layout), args.boxes, args.points, args.coarse, False)
    for line in weak.summary().lines():
        print(f"{args.image}: {line}", file=sys.stderr)
    from ..devices import resolve_device

    if args.through_stack and not weak.leading_shape:
        raise ConfigError(f"--through-stack: {args.image} is a single plane (shape {tuple(weak.image_shape)}); "
                          "prompts are carried through the planes of a stack")
    if not 0 < args.stack_iou <= 1:
        raise ConfigError(f"--stack-iou must be in (0, 1], got {args.stack_iou}")
    cache = EmbeddingCache(model.to(resolve_device(args.device)), image, layout, device=resolve_device(args.device))
    unadapted = " (the unadapted SAM)" if args.unadapted else ""
    if args.through_stack:
        from ..self_training.through_stack import segment_through_stack

        labels, objects, spans = segment_through_stack(cache, weak, adapters=not args.unadapted,
                                                       iou_threshold=args.stack_iou)
        write_image(args.out, labels, like=args.image)
        for span in spans:
            print(f"object {span.label} (prompted on plane {','.join(map(str, span.prompted))}): planes "
                  f"{span.first}-{span.last}", file=sys.stderr)
        print(f"{len(objects)} objects carried through the stack -> {args.out}{unadapted}")
        return 0
    labels, objects = segment_weak_labels(cache, weak, adapters=not args.unadapted)
    write_image(args.out, labels, like=args.image)
    print(f"{len(objects)} objects -> {args.out}{unadapted}")
    return 0


def add_segment_prompts_parser(sub: Any, add_layout_options: Any, add_run_options: Any) -> None:
    p = sub.add_parser("segment-prompts", help="segment every box, point group or coarse object of an image as one "
                       "instance, with a model adapted by 'adapt' (or any model's promptable SAM)")
    p.add_argument("--model", required=True, help="the adapted model (.safetensors)")
    p.add_argument("--checkpoint", default=None, help="its base SAM checkpoint (for an adapter file)")
    p.add_argument("--ignore-base-hash", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--image", required=True)
    p.add_argument("--boxes", default=None, help="a Shapes layer saved as .csv")
    p.add_argument("--points", default=None, help="a Points layer saved as .csv")
    p.add_argument("--coarse", default=None, help="a coarse label image")
    p.add_argument("--unadapted", action="store_true", help="segment with the SAM as loaded (adapters off), to compare")
    p.add_argument("--through-stack", action="store_true",
                   help="carry each object to the neighbouring planes of a stack (its mask's box and innermost "
                        "point as the next plane's prompt) until it ends; one id per object through the stack")
    p.add_argument("--stack-iou", type=float, default=STACK_IOU,
                   help=f"--through-stack: the smallest IoU of an object's masks on neighbouring planes that "
                        f"carries it on (default {STACK_IOU})")
    p.add_argument("--out", required=True, help="instance label image to write (.tif)")
    add_layout_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_segment_prompts)

