"""One process of a multi-process training run, for tests/test_data_parallel.py (run as a script).

    python parallel_worker.py ARGS.json

``ARGS.json``: checkpoint, image, labels, out, steps, grad_accum, lr, seed; optional resume, stop_at (process 0
sets the stop event when it sees that step), timeout_s, nan_at ([rank, n]: that process's loss is NaN from its
n-th micro-batch on). torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) come from the environment. Prints one JSON line per event ({"kind", "step"}) and, on a
training error, {"error": message}, each with its "rank", flushing each line so that a test can follow the run;
with ``log`` in ARGS.json, into ``<log>.<rank>.jsonl`` instead (torchrun mixes its processes' output).
"""

from __future__ import annotations

import json
import os
import sys
import threading

import tifffile
import torch

from napari_convlora.config import RunOptions, TrainRecipe
from napari_convlora.data import TrainingPair, prepare_training_data
from napari_convlora.training.data_parallel import from_environment
from napari_convlora.errors import TrainingError
from napari_convlora.training.loop import train


def main(path: str) -> int:
    args = json.loads(open(path).read())
    torch.set_num_threads(1)
    if args.get("mode") == "reduce":
        return reduce_gradients(args["log"])
    recipe = TrainRecipe(input_size=64, steps=args["steps"], grad_accum=args["grad_accum"], lr=args["lr"],
                         seed=args["seed"], class_names=("bg", "nucleus", "rod"), val_every=args.get("val_every", 2))
    pair = TrainingPair(tifffile.imread(args["image"]), tifffile.imread(args["labels"]))
    data = prepare_training_data([pair], recipe)
    processes = from_environment(args.get("timeout_s", 120))
    if args.get("nan_at") and args["nan_at"][0] == processes.rank:  # this process's loss turns NaN at that call
        poison_loss(int(args["nan_at"][1]))
    stop = threading.Event()
    out = open(f"{args['log']}.{processes.rank}.jsonl", "w") if args.get("log") else sys.stdout

    def emit(record: dict) -> None:
        print(json.dumps({"rank": processes.rank, **record}), file=out, flush=True)

    try:
        for event in train(args["checkpoint"], data, args["out"], recipe, RunOptions(device="cpu", num_threads=1),
                           resume_from=args.get("resume"), stop=stop, processes=processes):
            emit({"kind": event.kind, "step": event.step, "loss": event.loss})
            if processes.main and event.kind == "step" and event.step == args.get("stop_at"):
                stop.set()
    except TrainingError as e:
        emit({"error": str(e), "type": type(e).__name__})
        return 1
    return 0


def poison_loss(at_call: int) -> None:
    """From the ``at_call``-th micro-batch of this process on, the training loss is NaN."""
    import napari_convlora.training.loop as loop

    real, calls = loop.segmentation_loss, [0]

    def loss(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] >= at_call:
            losses["total"] = losses["total"] * float("nan")
        return losses

    loop.segmentation_loss = loss


def reduce_gradients(log: str) -> int:
    """Sum made-up gradients over the processes: p0 has one in each process (rank + 1), p1 only in process 1, p2
    in none. Writes the gradients and loss parts after ``reduce_step`` to ``<log>.<rank>.jsonl``."""
    processes = from_environment(60)
    torch.distributed.init_process_group("gloo")
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    params[0].grad = torch.full((3,), float(processes.rank + 1))
    if processes.rank == 1:
        params[1].grad = torch.tensor([1.0, 2.0, 3.0])
    parts, failed = processes.reduce_step(params, {"total": 0.5 * (processes.rank + 1)}, False, torch.device("cpu"))
    with open(f"{log}.{processes.rank}.jsonl", "w") as out:
        print(json.dumps({"rank": processes.rank, "parts": parts, "failed": failed,
                          "grads": [None if p.grad is None else p.grad.tolist() for p in params]}), file=out)
    torch.distributed.destroy_process_group()
    os._exit(0)  # as end_process does after training


if __name__ == "__main__":
    from napari_convlora.training.data_parallel import end_process

    sys.exit(end_process(main(sys.argv[1])))
