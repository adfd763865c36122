"""``napari-convlora predict`` of an image larger than memory: a Zarr / OME-Zarr store or a TIFF file predicted
into ``--out <name>.zarr`` block by block on dask (``blockwise``). Chosen by the ``.zarr`` names; every other
use of ``predict`` is unchanged (and refuses the options below)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from typing import Iterator

from ..errors import ConfigError

#: The options of this mode, refused with other inputs and outputs.
OPTIONS = ("scheduler", "workers", "memory_limit", "block_size")
DEFAULT_WORKERS = 2
DEFAULT_BLOCK_SIZE = 4096


def add_blockwise_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("images larger than memory (--image or --out a .zarr store; the 'large' extra)")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="a running dask.distributed scheduler, e.g. tcp://host:8786 (default: a local cluster)")
    group.add_argument("--workers", type=int, default=None,
                       help=f"workers of the local cluster, one thread each (default {DEFAULT_WORKERS})")
    group.add_argument("--memory-limit", default=None,
                       help="memory per local worker, e.g. 4GB (default: the machine's memory shared among them)")
    group.add_argument("--block-size", type=int, default=None,
                       help=f"side of a block in pixels, predicted by one task (default {DEFAULT_BLOCK_SIZE})")


def blockwise_requested(args: argparse.Namespace) -> bool:
    """True when ``predict`` should run blockwise: one image, and it or ``--out`` is a ``.zarr`` store.

    Raises:
        ConfigError: the options of this mode given without a Zarr store, or a Zarr store among several images.
    """
    from ..io.zarr_stores import is_zarr_path

    zarr_in = [image for image in args.image if is_zarr_path(image)]
    if len(args.image) > 1 and (zarr_in or is_zarr_path(args.out)):
        raise ConfigError(f"--image {(zarr_in or args.image)[0]}: a Zarr store is predicted alone; give one --image "
                          "with --out <name>.zarr")
    if zarr_in or is_zarr_path(args.out):
        return True
    given = [f"--{name.replace('_', '-')}" for name in OPTIONS if getattr(args, name, None) is not None]
    if given:
        raise ConfigError(f"{given[0]} applies to images predicted into a Zarr store (--out <name>.zarr)")
    return False


def cmd_predict_blockwise(args: argparse.Namespace) -> int:
    from ..prediction.blockwise.run import ModelSource, check_outputs, predict_blockwise
    from .options import image_layout as _layout, use_run_options
    from ..prediction.blockwise.cluster import dask_client
    from ..io.safety import check_outputs_are_not_inputs, check_writable
    from ..io.zarr_outputs import clear_interrupted
    from ..io.zarr_stores import open_lazy

    image_path = args.image[0]
    outputs = {"--out": args.out, "--probabilities": args.probabilities, "--instances": args.instances}
    for option, value in outputs.items():
        if value == "":
            raise ConfigError(f"{option}: give the Zarr store to write (<name>.zarr)")
    check_outputs(outputs)
    if args.instances_3d:
        raise ConfigError("--instances-3d: a Zarr output's instances are labelled plane by plane")
    if args.workers is not None and args.scheduler:
        raise ConfigError(f"--workers {args.workers}: the workers of --scheduler {args.scheduler} are its own")
    given = [(name, path) for name, path in outputs.items() if path is not None]
    for i, (name, path) in enumerate(given):
        check_outputs_are_not_inputs({name: path}, {"--image": image_path, "--model": args.model,
                                                    "--checkpoint": args.checkpoint, **dict(given[i + 1:])})
        check_writable(path, name)
    cleared = clear_interrupted(outputs)  # a run killed before (SIGKILL) left its temporary stores
    if cleared:
        print(cleared, file=sys.stderr, flush=True)
    image = open_lazy(image_path)
    device = use_run_options(args)
    source = ModelSource.of(args.model, args.checkpoint, not args.ignore_base_hash, str(device), args.threads or 1)
    source.config()  # a model file that cannot be used is refused before the cluster starts
    progress = _Progress()
    try:
        with _sigterm_as_interrupt(), dask_client(args.scheduler, args.workers or DEFAULT_WORKERS,
                                                  args.memory_limit or "auto") as client:
            result = predict_blockwise(source, image, args.out, _layout(args), args.probabilities, args.instances,
                                       args.overlap, args.batch_size, args.block_size or DEFAULT_BLOCK_SIZE,
                                       client, progress)
    except _Terminated:
        print("stopped by SIGTERM: nothing was written (the outputs appear only when complete)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted: nothing was written (the outputs appear only when complete)", file=sys.stderr)
        return 130
    print(f"labels {' x '.join(map(str, result.shape))} -> {result.outputs['labels']} ({result.blocks} blocks, "
          f"{result.tiles} tiles for {result.unique_tiles} in the grid, {result.seconds:.1f} s)")
    for kind in ("probabilities", "instances"):
        if kind in result.outputs:
            extra = f" ({result.instances} objects)" if kind == "instances" else ""
            print(f"{kind} -> {result.outputs[kind]}{extra}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C: the local cluster is closed and the temporary stores removed."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`_Terminated` (in the main thread only: signals are handled there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _Progress:
    """Blocks done on stderr, at most one line every 5 s (and the last)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.tiles = 0

    def __call__(self, done: int, total: int, outcome) -> None:
        self.tiles += outcome.tiles
        now = time.perf_counter()
        if done == total or now - self.last >= 5.0:
            self.last = now
            print(f"block {done}/{total}: {self.tiles} tiles in {now - self.start:.0f} s "
                  f"({self.tiles / max(now - self.start, 1e-9):.1f} tiles/s)", file=sys.stderr, flush=True)

