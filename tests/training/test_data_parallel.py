"""Training in several processes (torch.distributed, gloo on the CPU) computes what one process computes.

Each run here is real: two Python processes joined by gloo over localhost, the tiny SAM at 64 px, one thread each.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tifffile
import torch
from safetensors.torch import load_file

from napari_convlora.cli import main
from napari_convlora.checkpoints.training_state import state_path
from napari_convlora.training.data_parallel import Processes, micro_seed
from napari_convlora.errors import ConfigError
from napari_convlora.data.samples import synthetic_cells

WORKER = Path(__file__).resolve().parents[1] / "parallel_worker.py"
#: lr high enough that three steps move the adapter well beyond float rounding
LR = 1e-2


@pytest.fixture()
def files(tmp_path):
    image, labels = synthetic_cells(160, seed=0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(files: Path, tiny_checkpoint: Path, out: str, **options) -> Path:
    args = {"checkpoint": str(tiny_checkpoint), "image": str(files / "img.tif"), "labels": str(files / "lab.tif"),
            "out": str(files / out), "steps": 3, "grad_accum": 2, "lr": LR, "seed": 3, **options}
    spec = files / f"{out}.{len(list(files.glob('*.json')))}.json"
    spec.write_text(json.dumps(args))
    return spec


def _torchrun(files: Path, tiny_checkpoint: Path, world: int, out: str, **options) -> list[list[dict]]:
    """Train into ``files / out`` in ``world`` processes started by torchrun; each process's JSON lines."""
    log = files / f"{out}.log"
    spec = _spec(files, tiny_checkpoint, out, log=str(log), **options)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(WORKER), str(spec)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
    return [[json.loads(line) for line in Path(f"{log}.{rank}.jsonl").read_text().splitlines()]
            for rank in range(world)]


def _by_hand(files: Path, tiny_checkpoint: Path, world: int, out: str, **options) -> list[subprocess.Popen]:
    """The processes started one by one as torchrun would (process 0 holds the rendezvous), to kill one."""
    spec = _spec(files, tiny_checkpoint, out, **options)
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
                                             "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
            for rank in range(world)]


def _assert_close(a: Path, b: Path, atol: float) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    moved = max(ta[k].float().abs().max().item() for k in ta if "lora_B" in k)  # lora_B starts at zero
    assert moved > 1e-3, "the adapter did not train: the comparison would prove nothing"
    worst = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    assert worst <= atol, f"{a.name} and {b.name} differ by up to {worst:.2e}"


@pytest.mark.parametrize("grad_accum, atol", [(2, 1e-7), (4, 0.1 * LR)])
def test_two_processes_train_the_weights_one_process_trains(files, tiny_checkpoint, grad_accum, atol):
    """With two micro-batches a step, each process computes one and their sum is the single process's sum to
    the bit (a + b == b + a); with four, (g0 + g2) + (g1 + g3) rounds otherwise than ((g0 + g1) + g2) + g3, and
    AdamW's division by the root of its second moment magnifies that on the near-zero gradients: still far
    below one step's update (lr)."""
    one = _torchrun(files, tiny_checkpoint, 1, "one.safetensors", grad_accum=grad_accum)
    two = _torchrun(files, tiny_checkpoint, 2, "two.safetensors", grad_accum=grad_accum)
    _assert_close(files / "one.safetensors", files / "two.safetensors", atol)
    losses = lambda events: [e["loss"] for e in events if e["kind"] == "step"]  # noqa: E731
    assert losses(two[0]) == pytest.approx(losses(one[0]), rel=1e-4) and losses(two[0]) == losses(two[1])
    # process 0 alone validates and writes; the other computes the same steps quietly
    assert {e["kind"] for e in two[0]} >= {"validation", "saved", "finished"}
    assert {e["kind"] for e in two[1]} == {"start", "step", "finished"}
    assert not list(files.glob("two*.tmp*")) and not (files / "two.safetensors.lock").exists()


def test_gradients_are_summed_and_a_gradient_no_process_made_stays_none(files):
    spec = files / "reduce.json"
    spec.write_text(json.dumps({"mode": "reduce", "log": str(files / "reduce")}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(spec)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((files / f"reduce.{rank}.jsonl").read_text()) for rank in range(2)]
    for r in results:
        assert r["grads"] == [[3.0, 3.0, 3.0], [1.0, 2.0, 3.0], None]  # AdamW skips p2 as one process would
        assert r["parts"] == {"total": 1.5} and r["failed"] is False


def test_a_run_stopped_in_two_processes_resumes_in_one(files, tiny_checkpoint):
    _torchrun(files, tiny_checkpoint, 1, "whole.safetensors", steps=4)
    stopped = _torchrun(files, tiny_checkpoint, 2, "part.safetensors", steps=4, stop_at=2)
    assert [e["kind"] for e in stopped[0]][-1] == "stopped" and stopped[0][-1]["step"] == 2
    assert stopped[1][-1]["kind"] == "stopped" and stopped[1][-1]["step"] == 2  # all stop at the same step
    _torchrun(files, tiny_checkpoint, 1, "part.safetensors", steps=4, resume=str(files / "part.safetensors"))
    _assert_close(files / "whole.safetensors", files / "part.safetensors", 1e-7)


def test_a_killed_process_ends_the_run_with_a_message_not_a_hang(files, tiny_checkpoint):
    procs = _by_hand(files, tiny_checkpoint, 2, "killed.safetensors", steps=200, val_every=2, timeout_s=120)
    for line in procs[1].stdout:  # follow process 1 until it has made two steps, then kill it
        if json.loads(line).get("step", 0) >= 2:
            break
    procs[1].kill()
    started = time.monotonic()
    out, err = procs[0].communicate(timeout=150)
    procs[1].communicate()
    assert procs[0].returncode == 1, err[-3000:]
    error = json.loads(out.strip().splitlines()[-1])
    assert error["type"] == "ParallelError"
    assert "process 0 of 2: another process of this run ended or stopped answering" in error["error"]
    assert time.monotonic() - started < 100, "the survivor waited for its timeout instead of noticing"
    assert load_file(files / "killed.safetensors")  # the last save is whole
    assert not list(files.glob("killed*.tmp*")) and not (files / "killed.safetensors.lock").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_nan_loss_in_one_process_stops_every_process_at_that_step(files, tiny_checkpoint, rank):
    procs = _by_hand(files, tiny_checkpoint, 2, f"nan{rank}.safetensors", steps=20, nan_at=[rank, 3], timeout_s=60)
    ends = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err[-3000:]
        ends.append(json.loads(out.strip().splitlines()[-1]))
    # one micro-batch per process and step: that process's third is step 3; both processes stop there, and say so
    assert "the loss became nan at step 3" in ends[rank]["error"]
    assert "another process's loss or outputs became NaN or infinite at step 3" in ends[1 - rank]["error"]
    assert all(e["type"] == "TrainingError" for e in ends)
    assert load_file(files / f"nan{rank}.safetensors")  # the save after step 2 is kept, whole


def test_torchrun_trains_from_the_command_line(files, tiny_checkpoint):
    train = ["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"), "--labels",
             str(files / "lab.tif"), "--input-size", "64", "--steps", "2", "--grad-accum", "2", "--device", "cpu",
             "--threads", "1", "--class-names", "bg,nucleus,rod", "--lr", str(LR)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "napari_convlora", *train, "--out", str(files / "tr.safetensors")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in 2 processes" in proc.stderr and proc.stderr.count("finished 2 steps") == 1  # process 0 reports
    assert main([*train, "--out", str(files / "one.safetensors")]) == 0
    _assert_close(files / "one.safetensors", files / "tr.safetensors", 1e-7)


@pytest.mark.parametrize("ended", ["rank 0", "rank 1", "torchrun"])
def test_under_torchrun_an_ended_process_leaves_the_survivors_message_naming_the_last_save(files, tiny_checkpoint,
                                                                                         ended):
    """When one process dies torchrun ends the others, and stops all of them on SIGTERM (Ctrl+C); only torchrun's
    report reached the user, nothing naming the last save when process 0 was the one that died (issue 21)."""
    import signal

    import psutil

    out = files / "tk.safetensors"
    train = ["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"), "--labels",
             str(files / "lab.tif"), "--input-size", "64", "--steps", "400", "--grad-accum", "2", "--device", "cpu",
             "--threads", "1", "--val-every", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "napari_convlora", *train], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 150
        while not (out.exists() and state_path(out).exists()) and time.monotonic() < deadline:
            time.sleep(0.5)  # a first save
        assert out.exists(), "no save within the time"
        if ended == "torchrun":
            proc.send_signal(signal.SIGTERM)
        else:
            rank = ended.split()[1]
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == rank]
            assert workers
            workers[0].kill()
        _, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    survivors = [0, 1] if ended == "torchrun" else [1 - int(ended.split()[1])]
    for rank in survivors:
        assert f"napari-convlora train (process {rank} of 2): error: " in err, err[-3000:]
    if ended == "torchrun":
        assert "torchrun stopped this process" in err
    assert f"the last save is {out} (if any): continue with --resume {out}" in err
    assert load_file(out)  # whole
    assert not list(files.glob(".tk*.tmp"))


def test_micro_batches_must_share_out_over_the_processes(files, tiny_checkpoint, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="--grad-accum must be a multiple of 2"):
        Processes(0, 2).check_recipe(grad_accum=3, batch_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"), "--labels",
                 str(files / "lab.tif"), "--out", str(files / "m.safetensors"), "--grad-accum", "3", "--device", "cpu"])
    assert code == 2 and "--grad-accum must be a multiple of 2" in capsys.readouterr().err
    assert not (files / "m.safetensors").exists()


def test_each_micro_batch_has_its_own_seed_whatever_process_draws_it():
    seeds = {micro_seed(0, step, micro) for step in range(3) for micro in range(4)}
    assert len(seeds) == 12 and micro_seed(0, 1, 2) == micro_seed(0, 1, 2) != micro_seed(1, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)


def test_a_process_without_its_gpu_is_told_so_before_cuda_is_asked_anything(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device before the check"))
    with pytest.raises(ConfigError, match="process 1 needs GPU 1, but this machine shows 1"):
        Processes(rank=1, world_size=2, local_rank=1).device(torch.device("cuda"))
    assert Processes().device(torch.device("cuda")) == torch.device("cuda")  # one process: the caller's device


def test_training_leaves_a_process_group_it_did_not_make(files, tiny_checkpoint, tmp_path):
    from napari_convlora.config import RunOptions, TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.training.loop import train

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        recipe = TrainRecipe(input_size=64, steps=1, grad_accum=1, val_fraction=0.0)
        data = prepare_training_data([TrainingPair(tifffile.imread(files / "img.tif"),
                                                   tifffile.imread(files / "lab.tif"))], recipe)
        for _ in train(tiny_checkpoint, data, files / "g.safetensors", recipe, RunOptions(device="cpu", num_threads=1)):
            pass
        assert torch.distributed.is_initialized()  # the caller's group is the caller's to end
    finally:
        torch.distributed.destroy_process_group()


def test_a_state_saved_with_more_gpus_than_visible_restores(monkeypatch):
    import numpy as np

    from napari_convlora.checkpoints.training_state import restore_rng

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(len(states)))
    rng = np.random.default_rng(0)
    snap = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "cuda": [torch.zeros(8)] * 4}
    restore_rng(rng, snap)  # saved by a run on 4 GPUs, resumed where 1 is visible
    assert restored == [1]
