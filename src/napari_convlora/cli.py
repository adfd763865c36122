"""``napari-convlora``: train, predict, evaluate, info and demo from a terminal (no Qt, no napari).

The options build the same configuration objects as the dock (``config.TrainRecipe``, ``config.RunOptions``);
choice lists come from ``config.choices``. Nothing here imports torch until a command runs, so ``--help``
is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config.choices import DEVICES, HQ_MODES, LABEL_MODES, METHODS, PRECISIONS, UNPAINTED_PLANES
from .cli_adapt import add_adapt_parser, add_segment_prompts_parser
from .cli_blockwise import add_blockwise_options, blockwise_requested
from .errors import CheckpointError, ConfigError, TrainingError, describe_error

if TYPE_CHECKING:
    from .config import RunOptions, TrainRecipe
    from .data import ImageLayout
    from .modeling import AdaptedSAM


def _recipe(args: argparse.Namespace, start: "TrainRecipe") -> "TrainRecipe":
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
        num_mask_tokens=args.mask_tokens, hq=args.hq, val_fraction=args.val_fraction, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, val_every=args.val_every, seed=args.seed,
        augment=False if args.no_augment else None))


def _numbered(option: str, paths: Sequence[str]) -> dict[str, str]:
    return {option if len(paths) == 1 else f"{option} #{i + 1}": path for i, path in enumerate(paths)}


def _check_outputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Before any work: no output is an input or another output, and every output can be written."""
    from .safety import check_outputs_are_not_inputs, check_writable

    check_outputs_are_not_inputs(outputs, inputs)
    given = [(name, path) for name, path in outputs.items() if path is not None]
    for i, (name, path) in enumerate(given):
        check_outputs_are_not_inputs({name: path}, dict(given[i + 1:]))
        check_writable(path, name)


def _run_options(args: argparse.Namespace) -> "RunOptions":
    from .config import RunOptions

    return RunOptions(device=args.device, precision=getattr(args, "precision", "auto"), num_threads=args.threads,
                      activation_checkpointing=getattr(args, "activation_checkpointing", False))


def _layout(args: argparse.Namespace) -> "ImageLayout":
    from .data import ImageLayout

    return ImageLayout(rgb=args.rgb, channel_axis=args.channel_axis)


def _load(args: argparse.Namespace) -> "AdaptedSAM":
    from .files import load_model

    return load_model(args.model, base=args.checkpoint, check_base_hash=not args.ignore_base_hash)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainRecipe
    from .data import TrainingPair, prepare_training_data
    from .data_parallel import from_environment
    from .image_io import read_image
    from .progress import TerminalProgress
    from .train import init_recipe, resume_recipe, train

    if args.resume and args.init_from:
        raise ConfigError(f"--resume {args.resume} continues a run, --init-from {args.init_from} starts a new one "
                          "from a model: give one of them")
    if len(args.image) != len(args.labels):
        raise ConfigError(f"{len(args.image)} --image but {len(args.labels)} --labels: give them in pairs")
    if len(args.val_image) != len(args.val_labels):
        raise ConfigError(f"{len(args.val_image)} --val-image but {len(args.val_labels)} --val-labels: give them in pairs")
    from .training_state import best_path, metrics_path, state_path

    inputs = {"--checkpoint": args.checkpoint, **_numbered("--image", args.image), **_numbered("--labels", args.labels),
              **_numbered("--val-image", args.val_image), **_numbered("--val-labels", args.val_labels),
              "--init-from": args.init_from}
    _check_outputs({"--out": args.out, "the best file of --out": best_path(args.out),
                    "the training state of --out": state_path(args.out),
                    "the metrics table of --out": metrics_path(args.out)}, inputs)
    run = _run_options(args)
    if args.resume:  # the saved recipe continues, for longer if asked; report what other options would change
        saved, _ = resume_recipe(args.resume)
        requested = _recipe(args, saved)
        recipe = dataclasses.replace(saved, steps=requested.steps, epochs=requested.epochs)
        for note in requested.differences(recipe, "asked", "saved"):
            print(f"resuming {args.resume} with its saved recipe: {note}", file=sys.stderr)
        if recipe != saved:
            print(f"resuming {args.resume} for longer: {saved.steps or saved.epochs} -> "
                  f"{recipe.steps or recipe.epochs} {'steps' if recipe.steps else 'epochs'}; the learning rate now "
                  "decays over the new length (not the same as a run that long from the start)", file=sys.stderr)
    elif args.init_from:  # a new run from a trained model: its settings win; report the options they replace
        recipe, set_aside = init_recipe(args.init_from, _recipe(args, init_recipe(args.init_from)[0]))
        for note in set_aside:
            print(f"starting from {args.init_from} with its own settings: {note}", file=sys.stderr)
    else:
        recipe = _recipe(args, TrainRecipe())
    processes = from_environment(args.process_timeout)
    processes.check_recipe(recipe.grad_accum, recipe.batch_size)
    layout = _layout(args)
    pairs = [TrainingPair(read_image(i), read_image(l), layout) for i, l in zip(args.image, args.labels)]
    val = [TrainingPair(read_image(i), read_image(l), layout) for i, l in zip(args.val_image, args.val_labels)]
    data = prepare_training_data(pairs, recipe, val)
    if processes.main:
        print(f"label values {list(data.encoding.class_values)}; {data.summary()}", file=sys.stderr)
    stop = threading.Event()
    progress = TerminalProgress(class_names=recipe.class_names)
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
        if processes.main:
            print(f"the last save is {args.out} (if any): continue with --resume {args.out}, with any number of "
                  "processes", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        progress.close()  # before any error message
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .image_io import read_image, write_image
    from .predict import predict_image

    if blockwise_requested(args):  # a .zarr store in or out: block by block on dask
        from .cli_blockwise import cmd_predict_blockwise

        return cmd_predict_blockwise(args)
    folders = Path(args.image[0]).is_dir() or Path(args.out).is_dir() or args.out.endswith(("/", "\\"))
    if len(args.image) > 1 or folders:
        return _predict_many(args)
    for option, value in (("--probabilities", args.probabilities), ("--instances", args.instances)):
        if value == "":
            raise ConfigError(f"{option}: give the file to write (it is a switch only with several images or an "
                              "--out folder)")
    image = args.image[0]
    _check_outputs({"--out": args.out, "--probabilities": args.probabilities, "--instances": args.instances},
                   {"--image": image, "--model": args.model, "--checkpoint": args.checkpoint})
    device = _use_run_options(args)
    model = _load(args)
    result = predict_image(model, read_image(image), _layout(args), device=device, overlap=args.overlap,
                           batch_size=args.batch_size, return_probabilities=args.probabilities is not None,
                           instances=args.instances is not None, instances_3d=args.instances_3d)
    write_image(args.out, result.labels, like=image)
    print(f"labels {result.labels.shape} {result.labels.dtype} -> {args.out}")
    if args.probabilities:
        write_image(args.probabilities, result.probabilities, like=image)
        print(f"probabilities -> {args.probabilities}")
    if args.instances:
        write_image(args.instances, result.instances, like=image)
        print(f"instances -> {args.instances}")
    return 0


def _predict_many(args: argparse.Namespace) -> int:
    """``predict`` of several images or folders into the --out folder: one line per image on stderr, a summary
    on stdout; exit status 1 when any image was skipped."""
    import time

    from .batch_predict import expand_inputs, plan_outputs, predict_files, summary

    for option, value in (("--probabilities", args.probabilities), ("--instances", args.instances)):
        if value:
            raise ConfigError(f"{option} {value}: with several images or a folder {option} takes no file name; "
                              f"the outputs go to the --out folder as <name>_{option[2:]}.tif")
    images = expand_inputs(args.image)
    asked = {"probabilities": args.probabilities is not None, "instances": args.instances is not None}
    models = {"--model": args.model, "--checkpoint": args.checkpoint}
    plan_outputs(images, args.out, other_inputs=models, **asked)  # refused before the model is loaded
    device = _use_run_options(args)
    model = _load(args)
    results, start = [], time.perf_counter()
    try:
        for result in predict_files(model, images, args.out, _layout(args), device, args.overlap, args.batch_size,
                                    instances_3d=args.instances_3d, other_inputs=models, **asked):
            results.append(result)
            print(result.line(model.config.head.class_names), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"interrupted after {len(results)} of {len(images)} images; the outputs written are kept",
              file=sys.stderr)
        return 130
    print(summary(results, args.out, time.perf_counter() - start))
    return EXIT_FAILURE if any(not r.ok for r in results) else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .image_io import read_image
    from .predict import evaluate_image

    device = _use_run_options(args)
    model = _load(args)
    metrics = evaluate_image(model, read_image(args.image), read_image(args.labels), _layout(args), device=device)
    if args.json:
        head = model.config.head
        names = list(head.class_names or [f"class {i}" for i in range(head.num_classes)])
        print(json.dumps({"class_names": names, "class_values": list(head.class_values), **metrics.to_dict()},
                         indent=2))
    else:
        print(metrics.format(model.config.head.class_names))
    return 0


def _use_run_options(args: argparse.Namespace) -> "torch.device":  # noqa: F821 (torch imported lazily)
    from .devices import apply_run_options

    return apply_run_options(_run_options(args)).device


def cmd_info(args: argparse.Namespace) -> int:
    from .files import describe

    print(json.dumps(describe(args.path), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out_dir), checkpoint=args.checkpoint, steps=args.steps, run=_run_options(args),
             input_size=args.input_size)
    return 0


def cmd_export_bioimageio(args: argparse.Namespace) -> int:
    from .bioimageio_export import check_export, export_bioimageio
    from .image_io import read_image

    check_export(args.out, args.name, args.license)
    _check_outputs({"--out": args.out}, {"--model": args.model, "--checkpoint": args.checkpoint, "--image": args.image})
    device = _use_run_options(args)
    image = read_image(args.image) if args.image else None
    model = _load(args).to(device)
    path = export_bioimageio(model, args.out, image, _layout(args), plane=args.plane, name=args.name,
                             authors=args.author, description=args.description, license=args.license, tags=args.tag)
    print(f"BioImage Model Zoo package -> {path} (check it with: bioimageio test {path})")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)}, or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, fewer when other processes keep the CPUs busy)")


def _add_layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rgb", action="store_true", help="the last axis holds RGB(A) colours")
    p.add_argument("--channel-axis", type=int, default=None, help="axis of a multichannel image")


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune SAM on images and their labels",
                       description="Options left out take the recipe's defaults; with --resume the saved run's "
                                   "recipe is kept and the options that would change it are reported; with "
                                   "--init-from the model's adapter, input and label settings are kept likewise.")
    p.add_argument("--checkpoint", required=True, help="base SAM checkpoint (.pth), e.g. sam_vit_b_01ec64.pth")
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
    p.add_argument("--label-mode", default=None, choices=LABEL_MODES, help="default dense")
    p.add_argument("--background-value", type=int, default=None, help="label value of background (sparse: default 1)")
    p.add_argument("--unpainted-planes", default=None, choices=UNPAINTED_PLANES,
                   help="stacks: a plane where nothing is painted is not annotated (skip, default) or background")
    p.add_argument("--class-names", default=None, help="comma-separated, background first")
    p.add_argument("--input-size", type=int, default=None, help="SAM input side (default 1024, SAM's own; 512/256 faster)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the labelled planes (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="default 1")
    p.add_argument("--grad-accum", type=int, default=None, help="default 4")
    p.add_argument("--lr", type=float, default=None, help="default 1e-4")
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
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--channels", default=None, help="channels to use, e.g. 0,2 (for more than 3 channels)")
    p.add_argument("--low-percentile", type=float, default=None, help="default 1.0")
    p.add_argument("--high-percentile", type=float, default=None, help="default 99.8")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--activation-checkpointing", action="store_true", help="less GPU memory, ~30%% slower")
    p.add_argument("--process-timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a process waits for the others before the run fails (process 0 "
                        "validates and saves meanwhile; default 1800)")
    _add_layout_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-convlora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    add_adapt_parser(sub, _add_layout_options, _add_run_options)
    add_segment_prompts_parser(sub, _add_layout_options, _add_run_options)
    for name, helptext in (("predict", "segment an image, several or a folder of them"), ("evaluate", "compare a prediction with labels")):
        p = sub.add_parser(name, help=helptext, description="Channels, intensity percentiles and rescaling come "
                                                           "from the model, as it was trained.")
        p.add_argument("--model", required=True, help="adapter or bundle file (.safetensors)")
        p.add_argument("--checkpoint", default=None, help="base SAM checkpoint (for adapter files)")
        p.add_argument("--ignore-base-hash", action="store_true", help="accept a base with another sha256")
        p.add_argument("--image", required=True, action="append" if name == "predict" else "store",
                       help="an image file, or a folder of images (repeatable)" if name == "predict" else None)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--overlap", type=float, default=0.25)
        _add_layout_options(p)
        _add_run_options(p)
        if name == "predict":
            p.add_argument("--out", required=True, help="label image to write (.tif; .nii.gz or .nrrd with the "
                           "'medical' extra); with several images: the folder to write into (created if missing)")
            p.add_argument("--probabilities", nargs="?", const="", default=None, metavar="FILE",
                           help="also write class probabilities (.tif); a switch with several images")
            p.add_argument("--instances", nargs="?", const="", default=None, metavar="FILE",
                           help="also write connected components (.tif), labelled plane by plane for stacks; "
                                "a switch with several images")
            p.epilog = ("Several images: repeat --image, or give a folder (its .tif, .tiff, .png, .jpg, .jpeg, .bmp, "
                        ".nii, .nii.gz and .nrrd files, not recursive, by name), and let --out name a folder. Each "
                        "image <name> gets <name>_labels.tif there (a NIfTI or NRRD scan keeps its format and "
                        "geometry), and <name>_probabilities.tif / <name>_instances.tif with the switches "
                        "--probabilities / --instances. The model is loaded once; an image that cannot be read or "
                        "predicted is reported and skipped, and the exit status is then 1.")
            p.add_argument("--instances-3d", action="store_true", help="label components of stacks in 3D")
            add_blockwise_options(p)
            p.set_defaults(func=cmd_predict)
        else:
            p.add_argument("--labels", required=True)
            p.add_argument("--json", action="store_true", help="print machine-readable metrics")
            p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="describe a SAM checkpoint, adapter or bundle file")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="fine-tune, predict and evaluate on built-in sample data")
    p.add_argument("--out-dir", default="napari-convlora-demo")
    p.add_argument("--checkpoint", default=None, help="a SAM checkpoint instead of the built-in small SAM")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None)
    _add_run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export-bioimageio", help="write a model as a BioImage Model Zoo package (.zip)",
                       description="A self-contained package (base SAM, adapters, head) in the Model Zoo format "
                                   "(model spec 0.5), with a test input/output pair cut from --image (default: a "
                                   "built-in synthetic sample). Needs the 'bioimageio' extra.")
    p.add_argument("--model", required=True, help="adapter or bundle file (.safetensors)")
    p.add_argument("--checkpoint", default=None, help="base SAM checkpoint (for adapter files)")
    p.add_argument("--ignore-base-hash", action="store_true", help="accept a base with another sha256")
    p.add_argument("--out", required=True, help="the package to write (.zip)")
    p.add_argument("--image", default=None, help="an image like those the model segments, for the test input")
    p.add_argument("--plane", type=int, default=None, help="plane of a stack --image to use (default the middle)")
    p.add_argument("--name", default=None, help="5 to 128 letters, digits, spaces or _+-() (default: what the "
                                                 "model is)")
    p.add_argument("--author", action="append", default=[], help="an author's name (repeatable)")
    p.add_argument("--description", default=None)
    p.add_argument("--license", default="Apache-2.0", help="SPDX id (default Apache-2.0, SAM's license)")
    p.add_argument("--tag", action="append", default=[], help="an extra tag, e.g. fluorescence-light-microscopy "
                                                              "or nuclei (repeatable)")
    _add_layout_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_export_bioimageio)
    return parser


#: Exit statuses: 2 for options that cannot work (as argparse uses for usage errors), 1 for a failure while
#: working (a file that cannot be read or written, data that cannot train, a run that diverged, no memory).
EXIT_USAGE, EXIT_FAILURE = 2, 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"napari-convlora {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except (MemoryError, ValueError, CheckpointError, TrainingError, RuntimeError, OSError) as e:
        print(f"napari-convlora {args.command}: error: {describe_error(e)}", file=sys.stderr)
        code = EXIT_FAILURE
    if "napari_convlora.data_parallel" in sys.modules:  # a process of a torchrun run ends without finalisation
        return sys.modules["napari_convlora.data_parallel"].end_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
