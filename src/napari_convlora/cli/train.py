"""``napari-convlora train``: its options, and the run (one process, or one of several under torchrun)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from ..config.choices import (DETAIL_HEADS, HQ_MODES, INSTANCE_HEADS, LABEL_MODES, MASK_LOSSES, METHODS,
                              MULTICLASS_HEADS, PRECISIONS, UNPAINTED_PLANES)
from ..errors import ConfigError, TrainingError, describe_error
from .options import (EXIT_FAILURE, add_layout_options, add_run_options, check_outputs, end_process_with, image_layout,
                      numbered, run_options)

if TYPE_CHECKING:
    import numpy as np

    from ..config import TrainRecipe


def recipe_from(args: argparse.Namespace, start: "TrainRecipe") -> "TrainRecipe":
    """``start`` (the defaults, or a resumed run's saved recipe) with the options given on the command line."""
    def given(**values: Any) -> dict[str, Any]:
        return {k: v for k, v in values.items() if v is not None}

    low, high = start.input.percentiles
    percentiles = (args.low_percentile if args.low_percentile is not None else low,
                   args.high_percentile if args.high_percentile is not None else high)
    channels = tuple(int(c) for c in args.channels.split(",")) if args.channels else None
    adapter = dataclasses.replace(start.adapter, **given(
        method=args.method, rank=args.rank, alpha=args.alpha, num_experts=args.experts, top_k=args.top_k,
        weight_by_gate=True if args.weight_by_gate else None))
    spec = dataclasses.replace(start.input, percentiles=percentiles, **given(channels=channels, rescale=args.rescale))
    length = {"steps": args.steps, "epochs": None} if args.steps is not None else \
        {"steps": None, "epochs": args.epochs} if args.epochs is not None else {}
    return dataclasses.replace(start, adapter=adapter, input=spec, **length, **given(
        input_size=args.input_size, label_mode=args.label_mode, background_value=args.background_value,
        unpainted_planes=args.unpainted_planes,
        class_names=tuple(args.class_names.split(",")) if args.class_names else None,
        num_mask_tokens=args.mask_tokens, hq=args.hq, mask_loss=args.mask_loss, multiclass_head=args.multiclass_head,
        instance_head=args.instance_head, detail_head=args.detail_head, val_fraction=args.val_fraction,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, val_every=args.val_every, seed=args.seed,
        augment=False if args.no_augment else None))

def _read_labels(path: str, option: str) -> np.ndarray:
    """A label image file; one that holds no integer labels is refused in words about the file, not about numpy."""
    from ..io.images import read_image

    labels = read_image(path)
    if labels.dtype.kind not in "biu":
        raise ConfigError(f"{option} {path}: holds {labels.dtype} values, not integer labels: save the label image "
                          "with an integer type (uint8 or uint16, as napari saves a Labels layer)")
    return labels


def _stopped_by_torchrun(signum: int, frame: Any) -> None:
    """SIGTERM in a process of a torchrun group: torchrun ends the others when one fails, and stops them all when
    asked to (Ctrl+C). Raised as an error, so that the run leaves its group, keeps its last save whole and says so."""
    from ..training.data_parallel import ParallelError

    raise ParallelError("torchrun stopped this process (another process of the run ended, or the run was stopped)")


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import TrainRecipe
    from ..data import TrainingPair, prepare_training_data
    from ..training.data_parallel import ParallelError, end_process, from_environment
    from ..io.images import geometry_mismatch, read_image
    from .progress import TerminalProgress
    from ..training.loop import init_recipe, resume_recipe, train

    if args.resume and args.init_from:
        raise ConfigError(f"--resume {args.resume} continues a run, --init-from {args.init_from} starts a new one "
                          "from a model: give one of them")
    if len(args.image) != len(args.labels):
        raise ConfigError(f"{len(args.image)} --image but {len(args.labels)} --labels: give them in pairs")
    if len(args.val_image) != len(args.val_labels):
        raise ConfigError(f"{len(args.val_image)} --val-image but {len(args.val_labels)} --val-labels: give them in pairs")
    from ..checkpoints.builtin import describe_builtin, resolve_base
    from ..checkpoints.training_state import best_path, metrics_path, state_path

    builtin_by_default = args.checkpoint is None
    args.checkpoint = str(resolve_base(args.checkpoint))
    inputs = {"--checkpoint": args.checkpoint, **numbered("--image", args.image), **numbered("--labels", args.labels),
              **numbered("--val-image", args.val_image), **numbered("--val-labels", args.val_labels),
              "--init-from": args.init_from}
    check_outputs({"--out": args.out, "the best file of --out": best_path(args.out),
                    "the training state of --out": state_path(args.out),
                    "the metrics table of --out": metrics_path(args.out)}, inputs)
    run = run_options(args)
    processes = from_environment(args.process_timeout)
    end_process_with(end_process)  # a process that joined a torchrun group ends through end_process
    say = (lambda line: print(line, file=sys.stderr)) if processes.main else (lambda line: None)  # once, not N times
    if builtin_by_default:
        say(f"base model: {describe_builtin()} (--checkpoint builtin; give --checkpoint FILE for another)")
    base_notes: list[str] = []  # what a new run takes from its base, said once the data are read (a refusal of
    # the data stays one line)
    if args.resume:  # the saved recipe continues, for longer if asked; report what other options would change
        saved, _ = resume_recipe(args.resume)
        requested = recipe_from(args, saved)
        recipe = dataclasses.replace(saved, steps=requested.steps, epochs=requested.epochs)
        for note in requested.differences(recipe, "asked", "saved"):
            say(f"resuming {args.resume} with its saved recipe: {note}")
        if recipe != saved:
            before, after = saved.steps or saved.epochs, recipe.steps or recipe.epochs
            units = ["steps" if r.steps else "epochs" for r in (saved, recipe)]
            if units[0] == units[1]:
                how, length = ("for longer" if after > before else "for a shorter run"), f"{before} -> {after} {units[1]}"
            else:
                how, length = "with a new length", f"{before} {units[0]} -> {after} {units[1]}"
            say(f"resuming {args.resume} {how}: {length}; the learning rate now decays over the new length (not the "
                "same as a run that long from the start)")
    elif args.init_from:  # a new run from a trained model: its settings win; report the options they replace
        recipe, set_aside = init_recipe(args.init_from, recipe_from(args, init_recipe(args.init_from)[0]))
        for note in set_aside:
            say(f"starting from {args.init_from} with its own settings: {note}")
    else:  # a new run: the input size and learning rate follow the base unless given
        from ..training.recipes import BASE_FIELDS, base_defaults, defaults_notes, recipe_with

        defaults = base_defaults(args.checkpoint, run.device)  # the base is read once
        recipe = recipe_from(args, recipe_with(defaults))
        base_notes = defaults_notes(defaults, {f: getattr(args, f) for f in BASE_FIELDS},
                                    {"input_size": "--input-size", "lr": "--lr"})
    processes.check_recipe(recipe.grad_accum, recipe.batch_size)
    layout = image_layout(args)
    for image_path, labels_path in [*zip(args.image, args.labels), *zip(args.val_image, args.val_labels)]:
        mismatch = geometry_mismatch(image_path, labels_path)
        if mismatch:
            say(f"napari-convlora train: warning: {mismatch}")
    pairs = [TrainingPair(read_image(i), _read_labels(l, "--labels"), layout) for i, l in zip(args.image, args.labels)]
    val = [TrainingPair(read_image(i), _read_labels(l, "--val-labels"), layout)
           for i, l in zip(args.val_image, args.val_labels)]
    data = prepare_training_data(pairs, recipe, val)
    for note in base_notes:
        say(note)
    say(f"label values {list(data.encoding.class_values)}; {data.summary()}")
    for line in data.warnings:
        say(f"napari-convlora train: warning: {line}")
    stop = threading.Event()
    progress = TerminalProgress(class_names=recipe.class_names)
    if processes.parallel:  # torchrun ends the others with SIGTERM when one process fails: they still say so
        signal.signal(signal.SIGTERM, _stopped_by_torchrun)
    try:
        for event in train(args.checkpoint, data, args.out, recipe, run, resume_from=args.resume, stop=stop,
                           init_from=args.init_from, processes=processes):
            if processes.main:  # the others compute quietly
                progress.show(event)
    except KeyboardInterrupt:
        progress.close()
        if processes.main:
            print("interrupted: run again with --resume to continue from the last save", file=sys.stderr)
        return 130
    except (TrainingError, RuntimeError, MemoryError, OSError) as e:
        if not processes.parallel:
            raise
        progress.close()
        print(f"napari-convlora train (process {processes.rank} of {processes.world_size}): error: "
              f"{describe_error(e)}", file=sys.stderr)
        if processes.main or isinstance(e, ParallelError):  # process 0 may be the one that ended
            print(f"the last save is {args.out} (if any): continue with --resume {args.out}, with any number of "
                  "processes", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        progress.close()  # before any error message
    return 0

def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune SAM on images and their labels",
                       description="Options left out take the recipe's defaults; with --resume the saved run's "
                                   "recipe is kept and the options that would change it are reported; with "
                                   "--init-from the model's adapter, input and label settings are kept likewise.")
    p.add_argument("--checkpoint", default=None,
                   help="base SAM checkpoint (.pth), e.g. sam_vit_b_01ec64.pth, or 'builtin' (the built-in small SAM; "
                        "the default)")
    p.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    p.add_argument("--labels", action="append", required=True, help="its label image (same order as --image)")
    p.add_argument("--val-image", action="append", default=[], help="explicit validation image (repeatable)")
    p.add_argument("--val-labels", action="append", default=[], help="its labels")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--resume", default=None, help="continue the run saved in this adapter file (and its .training.pt)")
    p.add_argument("--init-from", default=None,
                   help="start a new run (step 0) from this trained model (adapter or bundle, on --checkpoint): its "
                        "adapter, head, input and label settings are kept; not with --resume")
    p.add_argument("--method", default=None, choices=METHODS,
                   help="default conv_lora; hq: HQ-SAM's regime (SAM frozen, only its HQ parts and the head train)")
    p.add_argument("--hq", default=None, choices=HQ_MODES,
                   help="HQ-SAM's output token and global-local fusion on the head, with any method: sam+hq adds the "
                        "HQ mask to SAM's (HQ-SAM's default), hq uses the HQ mask alone; an HQ-SAM checkpoint's "
                        "parts are used, a plain SAM gets new ones. Default off (sam+hq with --method hq)")
    p.add_argument("--mask-loss", default=None, choices=MASK_LOSSES,
                   help="binary models' loss: structure (PraNet's, default) or hq_points (HQ-SAM's point-sampled "
                        "BCE + dice); multi-class models use their own loss and refuse hq_points")
    p.add_argument("--label-mode", default=None, choices=LABEL_MODES, help="default dense")
    p.add_argument("--background-value", type=int, default=None, help="label value of background (sparse: default 1)")
    p.add_argument("--unpainted-planes", default=None, choices=UNPAINTED_PLANES,
                   help="stacks: a plane where nothing is painted is not annotated (skip, default) or background")
    p.add_argument("--class-names", default=None, help="comma-separated, background first")
    p.add_argument("--input-size", type=int, default=None,
                   help="SAM input side (default: the base's own on a GPU, at most 256 on a CPU and 512 on Apple MPS; "
                        "the log says which)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the labelled planes (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="default 1")
    p.add_argument("--grad-accum", type=int, default=None, help="default 4")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-4 for SAM's checkpoints, 1e-3 for small bases such as the built-in one")
    p.add_argument("--val-fraction", type=float, default=None, help="default 0.1")
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--rescale", type=float, default=None, help="resize factor for objects too large/small for SAM")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--weight-by-gate", action="store_true")
    p.add_argument("--mask-tokens", type=int, default=None, help="multi-class: number of mask tokens")
    p.add_argument("--multiclass-head", default=None, choices=MULTICLASS_HEADS,
                   help="3 classes or more: per_class (SAMed's: one token per class, cross-entropy + Dice; default) "
                        "or matched (Conv-LoRA's: 2K tokens, a class head, Hungarian matching); binary ignores it")
    p.add_argument("--instance-head", default=None, choices=INSTANCE_HEADS,
                   help="an instance head for touching objects (foreground, centre and depth maps split by a seeded "
                        "watershed, thresholds chosen on validation): auto (default) trains one with --label-mode "
                        "instances or sparse_instances; then predict --instances separates touching objects")
    p.add_argument("--detail-head", default=None, choices=DETAIL_HEADS,
                   help="correct the masks at the input's full resolution (for structures a few pixels wide: "
                        "membranes, small lesions); auto (default): on for inputs of 512 px or less, such as the "
                        "built-in model's, off for SAM's 1024 px")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--channels", default=None, help="channels to use, e.g. 0,2 (for more than 3 channels)")
    p.add_argument("--low-percentile", type=float, default=None, help="default 1.0")
    p.add_argument("--high-percentile", type=float, default=None, help="default 99.8")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--activation-checkpointing", action="store_true", help="less GPU memory, ~30%% slower")
    p.add_argument("--process-timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a process waits for the others before the run fails (process 0 "
                        "validates and saves meanwhile; default 1800)")
    add_layout_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_train)
