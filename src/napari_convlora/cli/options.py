"""What several ``napari-convlora`` commands share: run options, image layout, output checks, exit statuses."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..config.choices import DEVICES

if TYPE_CHECKING:
    import torch

    from ..config import RunOptions
    from ..data import ImageLayout
    from ..modeling import AdaptedSAM

#: Exit statuses: 2 for options that cannot work (as argparse uses for usage errors), 1 for a failure while
#: working (a file that cannot be read or written, data that cannot train, a run that diverged, no memory).
EXIT_USAGE, EXIT_FAILURE = 2, 1

#: How the process ends after a command, when a command needs its own ending (a torchrun process: see
#: ``training.data_parallel.end_process``); set by the command that needs it, read by ``console_main``.
_process_end: list[Callable[[int], int]] = []


def end_process_with(end: Callable[[int], int]) -> None:
    """Have ``console_main`` end the process through ``end(code)`` once the command has returned."""
    _process_end[:] = [end]


def end_process(code: int) -> int:
    """The exit status of the command, after the ending a command asked for (:func:`end_process_with`)."""
    return _process_end[0](code) if _process_end else code


def load_model_from_args(args: argparse.Namespace) -> "AdaptedSAM":
    """The model of ``--model`` (on ``--checkpoint``, checking the base's hash unless ``--ignore-base-hash``)."""
    from ..checkpoints.model_files import load_model

    return load_model(args.model, base=args.checkpoint, check_base_hash=not args.ignore_base_hash)


def use_run_options(args: argparse.Namespace) -> "torch.device":
    """Apply ``--device`` / ``--threads`` (and precision) to torch; the device to run on."""
    from ..devices import apply_run_options

    return apply_run_options(run_options(args)).device


def numbered(option: str, paths: Sequence[str]) -> dict[str, str]:
    return {option if len(paths) == 1 else f"{option} #{i + 1}": path for i, path in enumerate(paths)}

def check_outputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Before any work: no output is an input or another output, and every output can be written."""
    from ..io.safety import check_outputs_are_not_inputs, check_writable

    check_outputs_are_not_inputs(outputs, inputs)
    given = [(name, path) for name, path in outputs.items() if path is not None]
    for i, (name, path) in enumerate(given):
        check_outputs_are_not_inputs({name: path}, dict(given[i + 1:]))
        check_writable(path, name)

def run_options(args: argparse.Namespace) -> "RunOptions":
    from ..config import RunOptions

    return RunOptions(device=args.device, precision=getattr(args, "precision", "auto"), num_threads=args.threads,
                      activation_checkpointing=getattr(args, "activation_checkpointing", False))

def image_layout(args: argparse.Namespace) -> "ImageLayout":
    from ..data import ImageLayout

    return ImageLayout(rgb=args.rgb, channel_axis=args.channel_axis)

def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)}, or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, fewer when other processes keep the CPUs busy)")

def add_layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rgb", action="store_true", help="the last axis holds RGB(A) colours")
    p.add_argument("--channel-axis", type=int, default=None, help="axis of a multichannel image")
