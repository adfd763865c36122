"""What several ``napari-convlora`` commands share: run options, image layout, output checks, exit statuses."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Sequence

from .config.choices import DEVICES

if TYPE_CHECKING:
    from .config import RunOptions
    from .data import ImageLayout

#: Exit statuses: 2 for options that cannot work (as argparse uses for usage errors), 1 for a failure while
#: working (a file that cannot be read or written, data that cannot train, a run that diverged, no memory).
EXIT_USAGE, EXIT_FAILURE = 2, 1


def numbered(option: str, paths: Sequence[str]) -> dict[str, str]:
    return {option if len(paths) == 1 else f"{option} #{i + 1}": path for i, path in enumerate(paths)}

def check_outputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Before any work: no output is an input or another output, and every output can be written."""
    from .safety import check_outputs_are_not_inputs, check_writable

    check_outputs_are_not_inputs(outputs, inputs)
    given = [(name, path) for name, path in outputs.items() if path is not None]
    for i, (name, path) in enumerate(given):
        check_outputs_are_not_inputs({name: path}, dict(given[i + 1:]))
        check_writable(path, name)

def run_options(args: argparse.Namespace) -> "RunOptions":
    from .config import RunOptions

    return RunOptions(device=args.device, precision=getattr(args, "precision", "auto"), num_threads=args.threads,
                      activation_checkpointing=getattr(args, "activation_checkpointing", False))

def image_layout(args: argparse.Namespace) -> "ImageLayout":
    from .data import ImageLayout

    return ImageLayout(rgb=args.rgb, channel_axis=args.channel_axis)

def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)}, or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, fewer when other processes keep the CPUs busy)")

def add_layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rgb", action="store_true", help="the last axis holds RGB(A) colours")
    p.add_argument("--channel-axis", type=int, default=None, help="axis of a multichannel image")
