"""``napari-convlora``: train, predict, evaluate, info and demo from a terminal (no Qt, no napari).

The options build the same configuration objects as the dock (``config.TrainRecipe``, ``config.RunOptions``);
choice lists come from ``config.choices``. Nothing here imports torch until a command runs, so ``--help``
is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..config.choices import INSTANCE_METHOD_LABELS, INSTANCE_METHODS
from ..errors import CheckpointError, ConfigError, TrainingError, describe_error
from .adapt import add_adapt_parser, add_segment_prompts_parser
from .blockwise import add_blockwise_options, blockwise_requested
from .options import (EXIT_FAILURE, EXIT_USAGE, add_layout_options, add_run_options, check_outputs, end_process,
                      image_layout, load_model_from_args, run_options, use_run_options)
from .train import add_train_parser


def cmd_predict(args: argparse.Namespace) -> int:
    from ..io.images import read_image, write_image
    from ..prediction.planes import predict_image
    from .progress import TileProgress

    if blockwise_requested(args):  # a .zarr store in or out: block by block on dask
        from .blockwise import cmd_predict_blockwise

        if args.instance_method in ("head", "sam_refined", "everything"):
            raise ConfigError(f"--instance-method {args.instance_method}: block-by-block prediction (.zarr) finds "
                              "objects by connected components (stitched across blocks); the instance head and "
                              "segment everything run on images read whole")
        return cmd_predict_blockwise(args)
    folders = Path(args.image[0]).is_dir() or Path(args.out).is_dir() or args.out.endswith(("/", "\\"))
    if len(args.image) > 1 or folders:
        return _predict_many(args)
    for option, value in (("--probabilities", args.probabilities), ("--instances", args.instances)):
        if value == "":
            raise ConfigError(f"{option}: give the file to write (it is a switch only with several images or an "
                              "--out folder)")
    image = args.image[0]
    check_outputs({"--out": args.out, "--probabilities": args.probabilities, "--instances": args.instances},
                   {"--image": image, "--model": args.model, "--checkpoint": args.checkpoint})
    device = use_run_options(args)
    model = load_model_from_args(args)
    with TileProgress(f"predicting {Path(image).name}") as progress:
        result = predict_image(model, read_image(image), image_layout(args), device=device, overlap=args.overlap,
                               batch_size=args.batch_size, return_probabilities=args.probabilities is not None,
                               instances=args.instances is not None, instances_3d=args.instances_3d,
                               progress=progress, instance_method=args.instance_method)
    write_image(args.out, result.labels, like=image)
    print(f"labels {result.labels.shape} {result.labels.dtype} -> {args.out}")
    if args.probabilities:
        write_image(args.probabilities, result.probabilities, like=image)
        print(f"probabilities -> {args.probabilities}")
    if args.instances:
        write_image(args.instances, result.instances, like=image)
        print(f"instances ({INSTANCE_METHOD_LABELS[result.instance_method]}) -> {args.instances}")
    return 0


def _predict_many(args: argparse.Namespace) -> int:
    """``predict`` of several images or folders into the --out folder: one line per image on stderr, a summary
    on stdout; exit status 1 when any image was skipped."""
    import time

    from ..prediction.batch import expand_inputs, plan_outputs, predict_files, summary

    for option, value in (("--probabilities", args.probabilities), ("--instances", args.instances)):
        if value:
            raise ConfigError(f"{option} {value}: with several images or a folder {option} takes no file name; "
                              f"the outputs go to the --out folder as <name>_{option[2:]}.tif")
    images = expand_inputs(args.image)
    asked = {"probabilities": args.probabilities is not None, "instances": args.instances is not None}
    models = {"--model": args.model, "--checkpoint": args.checkpoint}
    plan_outputs(images, args.out, other_inputs=models, **asked)  # refused before the model is loaded
    device = use_run_options(args)
    model = load_model_from_args(args)
    results, start = [], time.perf_counter()
    try:
        for result in predict_files(model, images, args.out, image_layout(args), device, args.overlap, args.batch_size,
                                    instances_3d=args.instances_3d, other_inputs=models,
                                    instance_method=args.instance_method, **asked):
            results.append(result)
            print(result.line(model.config.head.class_names), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"interrupted after {len(results)} of {len(images)} images; the outputs written are kept",
              file=sys.stderr)
        return 130
    print(summary(results, args.out, time.perf_counter() - start))
    return EXIT_FAILURE if any(not r.ok for r in results) else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..config.choices import INSTANCE_LABEL_MODES
    from ..instances.metrics import format_instance_line
    from ..io.images import read_image
    from ..prediction.planes import evaluate_image, evaluate_objects, predict_image

    device = use_run_options(args)
    model = load_model_from_args(args)
    image, labels, layout = read_image(args.image), read_image(args.labels), image_layout(args)
    objects = model.config.head.label_mode in INSTANCE_LABEL_MODES  # instance labels: objects are scored too
    prediction = predict_image(model, image, layout, device=device, instances=True) if objects else None
    metrics = evaluate_image(model, image, labels, layout, device=device, prediction=prediction)
    scores = evaluate_objects(model, labels, prediction) if objects else None
    if args.json:
        head = model.config.head
        names = list(head.class_names or [f"class {i}" for i in range(head.num_classes)])
        found = {"instances": {"method": prediction.instance_method, **scores.as_dict()}} if scores else {}
        print(json.dumps({"class_names": names, "class_values": list(head.class_values), **metrics.to_dict(),
                          **found}, indent=2))
    else:
        print(metrics.format(model.config.head.class_names))
        if scores is not None:
            print(f"{format_instance_line(scores)} ({INSTANCE_METHOD_LABELS[prediction.instance_method]})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoints.model_files import describe

    print(json.dumps(describe(args.path), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out_dir), checkpoint=args.checkpoint, steps=args.steps, run=run_options(args),
             input_size=args.input_size)
    return 0


def cmd_export_bioimageio(args: argparse.Namespace) -> int:
    from ..bioimageio.export import check_export, export_bioimageio
    from ..io.images import read_image

    check_export(args.out, args.name, args.license, args.author)
    check_outputs({"--out": args.out}, {"--model": args.model, "--checkpoint": args.checkpoint, "--image": args.image})
    device = use_run_options(args)
    image = read_image(args.image) if args.image else None
    model = load_model_from_args(args).to(device)
    path = export_bioimageio(model, args.out, image, image_layout(args), plane=args.plane, name=args.name,
                             authors=args.author, description=args.description, license=args.license, tags=args.tag,
                             model_file=args.model)
    print(f"BioImage Model Zoo package -> {path} (check it with: bioimageio test {path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-convlora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_adapt_parser(sub, add_layout_options, add_run_options)
    add_segment_prompts_parser(sub, add_layout_options, add_run_options)
    for name, helptext in (("predict", "segment an image, several or a folder of them"), ("evaluate", "compare a prediction with labels")):
        p = sub.add_parser(name, help=helptext, description="Channels, intensity percentiles and rescaling come "
                                                           "from the model, as it was trained.")
        p.add_argument("--model", required=True, help="adapter or bundle file (.safetensors)")
        p.add_argument("--checkpoint", default=None, help="base SAM checkpoint (for adapter files), or 'builtin'")
        p.add_argument("--ignore-base-hash", action="store_true", help="accept a base with another sha256")
        p.add_argument("--image", required=True, action="append" if name == "predict" else "store",
                       help="an image file, or a folder of images (repeatable)" if name == "predict" else None)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--overlap", type=float, default=0.25)
        add_layout_options(p)
        add_run_options(p)
        if name == "predict":
            p.add_argument("--out", required=True, help="label image to write (.tif; .nii.gz or .nrrd with the "
                           "'medical' extra); with several images: the folder to write into (created if missing)")
            p.add_argument("--probabilities", nargs="?", const="", default=None, metavar="FILE",
                           help="also write class probabilities (.tif); a switch with several images")
            p.add_argument("--instances", nargs="?", const="", default=None, metavar="FILE",
                           help="also write objects (.tif), labelled plane by plane for stacks (see "
                                "--instance-method); a switch with several images")
            p.add_argument("--instance-method", default="auto", choices=INSTANCE_METHODS,
                           help="how --instances finds objects: auto (default: the model's instance head when it "
                                "has one, touching objects apart; else connected components), head, sam_refined (the "
                                "head's objects as box + point prompts to SAM), components, everything (SAM's "
                                "automatic mask generator on the adapted encoder: a grid of point prompts; no "
                                "instance labels needed)")
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
    p.add_argument("path", help="the file, or 'builtin' for the built-in small SAM")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="fine-tune, predict and evaluate on built-in sample data")
    p.add_argument("--out-dir", default="napari-convlora-demo")
    p.add_argument("--checkpoint", default=None, help="a SAM checkpoint instead of the built-in small SAM ('builtin', "
                                                       "the default)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None)
    add_run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export-bioimageio", help="write a model as a BioImage Model Zoo package (.zip)",
                       description="A self-contained package (base SAM, adapters, head) in the Model Zoo format "
                                   "(model spec 0.5), with a test input/output pair cut from --image (default: a "
                                   "built-in synthetic sample). Needs the 'bioimageio' extra.")
    p.add_argument("--model", required=True, help="adapter or bundle file (.safetensors)")
    p.add_argument("--checkpoint", default=None, help="base SAM checkpoint (for adapter files), or 'builtin'")
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
    add_layout_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_export_bioimageio)
    return parser


def _name_builtin(args: argparse.Namespace) -> None:
    """``--checkpoint builtin`` (and ``info builtin``) name the built-in model's file."""
    from ..checkpoints.builtin import BUILTIN_NAME, builtin_checkpoint

    if getattr(args, "checkpoint", None) == BUILTIN_NAME:
        args.checkpoint = str(builtin_checkpoint())
    if args.command == "info" and args.path == BUILTIN_NAME:
        args.path = str(builtin_checkpoint())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _name_builtin(args)
        code = args.func(args)
    except ConfigError as e:
        print(f"napari-convlora {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except (MemoryError, ValueError, CheckpointError, TrainingError, RuntimeError, OSError) as e:
        print(f"napari-convlora {args.command}: error: {describe_error(e)}", file=sys.stderr)
        code = EXIT_FAILURE
    return code


def console_main() -> int:
    """The ``napari-convlora`` command and ``python -m napari_convlora``: :func:`main`, then a process that trained
    in a torchrun group ends without the interpreter's finalisation (``options.end_process``)."""
    code = main()
    return end_process(code)


if __name__ == "__main__":
    sys.exit(console_main())
