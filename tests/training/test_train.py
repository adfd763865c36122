"""The training loop on a tiny SAM: it learns, it stops and resumes exactly, it keeps good files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import drain

from napari_convlora import CheckpointError, load_model
from napari_convlora.config import RunOptions, TrainRecipe
from napari_convlora.data import TrainingPair, prepare_training_data
from napari_convlora.metrics import selection_score
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.training.loop import TrainingError, resume_recipe, train
from napari_convlora.checkpoints.training_state import best_path, state_path

CPU = RunOptions(device="cpu")


def _recipe(**kw) -> TrainRecipe:
    """Nuclei and rods as one foreground class (instances mode, without the instance head that mode trains by
    default: these tests are about the loop; the head's own are in test_instance_head_training.py), 128 px
    patches."""
    base = dict(input_size=128, label_mode="instances", instance_head="off", val_fraction=0.2, steps=40,
                batch_size=4, grad_accum=1, lr=2e-3, val_every=20, seed=0)
    base.update(kw)
    return TrainRecipe(**base)


def _prepare(recipe: TrainRecipe):
    image, labels = synthetic_cells(256, seed=0)
    return prepare_training_data([TrainingPair(image, labels)], recipe)


@pytest.fixture(scope="module")
def cells():
    return _prepare(_recipe())


def test_training_lowers_loss_and_improves_validation(tmp_path, tiny_checkpoint, cells):
    out = tmp_path / "model.safetensors"
    events, model = drain(train(tiny_checkpoint, cells, out, _recipe(steps=150, val_every=75), CPU))
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished"
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 151))
    assert all(e.lr is not None and e.images_per_s > 0 and e.eta_s >= 0 for e in steps)
    first, last = np.mean([e.loss for e in steps[:10]]), np.mean([e.loss for e in steps[-10:]])
    assert last < 0.75 * first
    validations = [e for e in events if e.kind == "validation"]
    assert validations[0].step == 0 and validations[-1].step == 150
    before = validations[0].metrics["mean_iou_foreground"]
    after = validations[-1].metrics["mean_iou_foreground"]
    assert after > before + 0.25  # measured: 0.05 -> 0.55 (tiny random-encoder SAM)
    assert out.exists() and best_path(out).exists() and state_path(out).exists()
    reloaded = load_model(out, base=tiny_checkpoint)
    assert reloaded.config.head.class_values == (0, 1) and reloaded.config.head.label_mode == "instances"
    x = torch.rand(1, 3, 128, 128) * 255
    assert torch.equal(reloaded.class_probabilities(x), model.class_probabilities(x))


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_stop_and_resume_equal_uninterrupted(tmp_path, tiny_checkpoint, cells, grad_accum):
    recipe = _recipe(steps=12, val_every=5, grad_accum=grad_accum, batch_size=2)
    full = tmp_path / "full.safetensors"
    drain(train(tiny_checkpoint, cells, full, recipe, CPU))

    part = tmp_path / "part.safetensors"
    stop = threading.Event()
    events, _ = drain(train(tiny_checkpoint, cells, part, recipe, CPU, stop=stop), stop_at=7, stop=stop)
    assert events[-1].kind == "stopped" and events[-1].step == 7
    assert load_file(str(part)).keys() == load_file(str(full)).keys()
    resumed = tmp_path / "resumed.safetensors"
    events, _ = drain(train(tiny_checkpoint, cells, resumed, recipe, CPU, resume_from=part))
    assert [e.step for e in events if e.kind == "step"] == list(range(8, 13))
    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_mid_accumulation_discards_the_half_step(tmp_path, tiny_checkpoint, cells):
    recipe = _recipe(steps=6, grad_accum=4, batch_size=1, val_every=100)
    stop = threading.Event()
    gen = train(tiny_checkpoint, cells, tmp_path / "m.safetensors", recipe, CPU, stop=stop)
    calls = {"n": 0}
    original = cells.sampler.sample

    def counting(rng, batch):
        calls["n"] += 1
        if calls["n"] == 10:  # inside step 3 (micro-batches 9..12)
            stop.set()
        return original(rng, batch)

    cells.sampler.sample = counting
    try:
        events, _ = drain(gen)
    finally:
        del cells.sampler.sample
    assert events[-1].kind == "stopped" and events[-1].step == 2


def test_nan_loss_stops_and_keeps_last_good_file(tmp_path, tiny_checkpoint, cells, monkeypatch):
    out = tmp_path / "m.safetensors"
    drain(train(tiny_checkpoint, cells, out, _recipe(steps=4, val_every=2), CPU))
    good = out.read_bytes()
    import napari_convlora.training.loop as train_module

    real = train_module.segmentation_loss

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(train_module, "segmentation_loss", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 1"):
        drain(train(tiny_checkpoint, cells, out, _recipe(steps=4, val_every=2), CPU))
    assert out.read_bytes() == good


def test_each_method_trains(tmp_path, tiny_checkpoint, cells):
    from napari_convlora.config import AdapterConfig

    for method in ("lora", "decoder"):
        events, model = drain(train(tiny_checkpoint, cells, tmp_path / f"{method}.safetensors",
                                   _recipe(adapter=AdapterConfig(method=method), steps=3, val_every=3), CPU))
        assert model.config.adapter.method == method and events[-1].kind == "finished"


def _stopped_run(tmp_path, tiny_checkpoint, recipe, stop_at=3):
    part = tmp_path / "part.safetensors"
    stop = threading.Event()
    drain(train(tiny_checkpoint, _prepare(recipe), part, recipe, CPU, stop=stop), stop_at=stop_at, stop=stop)
    return part


def test_resume_after_changing_the_input_size_uses_the_saved_recipe(tmp_path, tiny_checkpoint):
    """Stopped at 128 px, resumed from a form or command line that says 64: the data must be cut at the saved
    size before training (cutting them at 64 px failed with a shape error at the first step)."""
    recipe = _recipe(steps=6, val_every=3, batch_size=2)
    full = tmp_path / "full.safetensors"
    drain(train(tiny_checkpoint, _prepare(recipe), full, recipe, CPU))
    part = _stopped_run(tmp_path, tiny_checkpoint, recipe)
    asked = _recipe(steps=6, val_every=3, batch_size=2, input_size=64)
    with pytest.raises(TrainingError, match=r"another recipe \(input_size: 64 asked, 128 saved\)"):
        drain(train(tiny_checkpoint, _prepare(asked), tmp_path / "x.safetensors", asked, CPU, resume_from=part))
    saved, notes = resume_recipe(part, requested=asked)
    assert saved == recipe and notes == ["input_size: 64 asked, 128 saved"]
    resumed = tmp_path / "resumed.safetensors"
    events, _ = drain(train(tiny_checkpoint, _prepare(saved), resumed, run=CPU, resume_from=part))
    assert [e.step for e in events if e.kind == "step"] == [4, 5, 6]
    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_cut_for_another_recipe_are_refused(tmp_path, tiny_checkpoint, cells):
    other = _recipe(input_size=64)
    with pytest.raises(TrainingError, match=r"prepared for another recipe \(input_size: 64 to train, 128 in the data\)"):
        drain(train(tiny_checkpoint, cells, tmp_path / "m.safetensors", other, CPU))
    assert not (tmp_path / "m.safetensors").exists()
    faster = _recipe(lr=1e-3, steps=2)  # other optimisation settings need no new data
    events, _ = drain(train(tiny_checkpoint, cells, tmp_path / "m.safetensors", faster, CPU))
    assert events[-1].kind == "finished"


def test_run_options_are_not_saved_and_come_from_the_caller(tmp_path, tiny_checkpoint):
    """A run started on CUDA must resume on a CPU-only machine: the device is never part of the saved state."""
    recipe = _recipe(steps=4, val_every=2)
    part = _stopped_run(tmp_path, tiny_checkpoint, recipe, stop_at=2)
    state = torch.load(state_path(part), map_location="cpu", weights_only=True)
    assert "device" not in str(state["recipe"]) and "precision" not in state["recipe"]
    events, _ = drain(train(tiny_checkpoint, _prepare(recipe), tmp_path / "r.safetensors",
                           run=RunOptions(device="cpu", num_threads=1), resume_from=part))
    assert "on cpu" in events[0].message and events[-1].kind == "finished"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            drain(train(tiny_checkpoint, _prepare(recipe), tmp_path / "c.safetensors",
                       run=RunOptions(device="cuda"), resume_from=part))


def test_a_finished_run_resumed_into_a_new_file_writes_it(tmp_path, tiny_checkpoint, cells):
    recipe = _recipe(steps=3, val_every=3)
    done = tmp_path / "done.safetensors"
    drain(train(tiny_checkpoint, cells, done, recipe, CPU))
    again = tmp_path / "elsewhere" / "again.safetensors"
    events, _ = drain(train(tiny_checkpoint, cells, again, recipe, CPU, resume_from=done))
    assert [e.kind for e in events] == ["start", "saved", "finished"]
    assert again.is_file() and state_path(again).is_file() and best_path(again).is_file()
    a, b = load_file(str(done)), load_file(str(again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_version_1_training_state_is_refused_with_a_reason(tmp_path, tiny_checkpoint, cells):
    recipe = _recipe(steps=2, val_every=2)
    done = tmp_path / "old.safetensors"
    drain(train(tiny_checkpoint, cells, done, recipe, CPU))
    torch.save({"step": 2, "optimizer": {}, "scheduler": {}, "rng": {}, "train_config": {"device": "cuda"}},
               state_path(done))
    with pytest.raises(CheckpointError, match="napari-convlora 0.1.*cannot be resumed exactly"):
        resume_recipe(done)


def test_a_run_killed_between_its_model_and_its_state_resumes_exactly(tmp_path, tiny_checkpoint):
    """The model and its state are two writes: after a crash between them the pair was from two saves and could not
    be resumed ("train anew", issue 21). The state now holds its own copy of the weights: the run resumes from the
    state's step and ends as an uninterrupted run does."""
    from safetensors.torch import load_file

    recipe = _recipe(steps=4, val_every=2)
    full = tmp_path / "full.safetensors"
    drain(train(tiny_checkpoint, _prepare(recipe), full, recipe, CPU))
    part = _stopped_run(tmp_path, tiny_checkpoint, recipe, stop_at=2)
    older_state = state_path(part).read_bytes()
    events, _ = drain(train(tiny_checkpoint, _prepare(recipe), part, recipe, CPU, resume_from=part))
    assert events[-1].kind == "finished"
    state_path(part).write_bytes(older_state)  # killed after writing the model of step 4, before its state
    resumed = tmp_path / "r.safetensors"
    events, _ = drain(train(tiny_checkpoint, _prepare(recipe), resumed, run=CPU, resume_from=part))
    assert [e.step for e in events if e.kind == "step"] == [3, 4]
    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_file_that_does_not_match_its_training_state_is_refused(tmp_path, tiny_checkpoint):
    """A state written before 0.3 holds no weights: its model file must be of the same save. A model file replaced by
    another run's is refused either way."""
    from napari_convlora.config import AdapterConfig

    recipe = _recipe(steps=4, val_every=2)
    part = _stopped_run(tmp_path, tiny_checkpoint, recipe, stop_at=2)
    state = torch.load(state_path(part), map_location="cpu", weights_only=True)
    older = {k: v for k, v in state.items() if k != "trainable"}  # as 0.2 wrote it
    drain(train(tiny_checkpoint, _prepare(recipe), part, recipe, CPU, resume_from=part))
    torch.save(older, state_path(part))  # the state of step 2 beside the model of step 4
    with pytest.raises(CheckpointError, match=r"part.safetensors: the model file and its training state "
                                              r"\(part.training.pt, step 2\) are not from the same save"):
        drain(train(tiny_checkpoint, _prepare(recipe), tmp_path / "r.safetensors", run=CPU, resume_from=part))
    torch.save(state, state_path(part))
    other_recipe = _recipe(adapter=AdapterConfig(method="lora"), steps=2, val_every=2)
    other = tmp_path / "other.safetensors"
    drain(train(tiny_checkpoint, _prepare(other_recipe), other, other_recipe, CPU))
    part.write_bytes(other.read_bytes())  # the model file replaced by another run's
    with pytest.raises((CheckpointError, TrainingError), match="was one of them replaced"):
        drain(train(tiny_checkpoint, _prepare(recipe), tmp_path / "r.safetensors", run=CPU, resume_from=part))


def test_diverging_weights_are_never_saved_and_predict_refuses_them(tmp_path, tiny_checkpoint, cells, monkeypatch):
    """After a NaN, the "last good" and "best" files were the broken model (100 % NaN probabilities, validation
    97 % accuracy, predict wrote background with exit 0)."""
    from safetensors.torch import save_file

    out = tmp_path / "m.safetensors"
    drain(train(tiny_checkpoint, cells, out, _recipe(steps=2, val_every=2), CPU))
    good, good_best = out.read_bytes(), best_path(out).read_bytes()
    real_step = torch.optim.AdamW.step

    def diverging_step(self, *args, **kwargs):  # the weights blow up while the loss was still finite
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging_step)
    with pytest.raises(TrainingError, match=r"weights became NaN or infinite \(sam.image_encoder.blocks.0.attn.qkv."
                                            r"lora_A.weight and 0 more\) at step 1; training stopped and nothing "
                                            r"non-finite was saved \(the last good model is .*m.safetensors\)"):
        drain(train(tiny_checkpoint, cells, out, _recipe(steps=4, val_every=2), CPU))
    assert out.read_bytes() == good and best_path(out).read_bytes() == good_best
    tensors = load_file(str(out))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="nan.safetensors: 1 tensors hold NaN or infinite values"):
        load_model(tmp_path / "nan.safetensors", base=tiny_checkpoint)


def test_non_finite_outputs_stop_a_multi_class_run_with_a_message(tmp_path, tiny_checkpoint, monkeypatch):
    """With 3 classes a NaN was not detected: the Hungarian matching failed first with scipy's ValueError."""
    from napari_convlora.modeling import AdaptedSAM

    recipe = _recipe(label_mode="dense", steps=2, val_every=2, multiclass_head="matched")  # the matching's head
    data = _prepare(recipe)
    assert data.encoding.num_classes == 3
    real_forward = AdaptedSAM.forward

    def nan_forward(self, images):  # in training only: validation before step 1 would stop the run first
        out = real_forward(self, images)
        if self.training:
            out.class_logits = out.class_logits * float("nan")
        return out

    monkeypatch.setattr(AdaptedSAM, "forward", nan_forward)
    with pytest.raises(TrainingError, match="the model's outputs became NaN or infinite at step 1"):
        drain(train(tiny_checkpoint, data, tmp_path / "m.safetensors", recipe, CPU))
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("val_fraction, stop_at, what", [
    (0.2, None, "outputs on the validation data"),  # the reported case: validated at every step
    (0.0, None, "outputs"),  # no validation data: the last micro-batch through the updated weights
    (0.2, 1, "outputs"),  # stopped between validations: the "stopped" save
])
def test_weights_that_are_finite_but_output_nan_are_never_saved_as_good_or_best(tmp_path, tiny_checkpoint, val_fraction,
                                                                                stop_at, what):
    """``--lr 1e6``: after step 1 the weights were finite and every output NaN; the next forward stopped the run
    saying nothing non-finite was saved, but the out file and the best file were that model (predict from them
    wrote background with exit 0). Validation took the argmax of the NaN without looking."""
    healthy = _recipe(val_fraction=val_fraction, steps=2, val_every=2)
    out = tmp_path / "m.safetensors"
    drain(train(tiny_checkpoint, _prepare(healthy), out, healthy, CPU))
    good = out.read_bytes()
    good_best = best_path(out).read_bytes() if val_fraction else None
    diverging = _recipe(val_fraction=val_fraction, steps=4, val_every=3 if stop_at else 1, lr=1e6)
    stop = threading.Event()
    with pytest.raises(TrainingError, match=rf"^the model's {what} became NaN or infinite at step 1; training "
                                            r"stopped and nothing non-finite was saved \(the last good model is "
                                            r".*m.safetensors\)"):
        drain(train(tiny_checkpoint, _prepare(diverging), out, diverging, CPU, stop=stop), stop_at=stop_at, stop=stop)
    assert out.read_bytes() == good
    assert (best_path(out).read_bytes() if val_fraction else None) == good_best
    model = load_model(out, base=tiny_checkpoint)
    with torch.no_grad():
        assert bool(torch.isfinite(model.class_probabilities(torch.rand(2, 3, 128, 128) * 255)).all())


def test_validation_refuses_outputs_that_are_not_finite(tmp_path, tiny_checkpoint, cells):
    """The argmax of NaN is class 0: validation scored a model whose every output was NaN (97 % accuracy)."""
    from napari_convlora.training.loop import validate

    _, model = drain(train(tiny_checkpoint, cells, tmp_path / "m.safetensors", _recipe(steps=1, val_every=1), CPU))
    assert validate(model, cells, torch.device("cpu"))["mean_iou"] >= 0
    with torch.no_grad():
        model.head.mask_tokens.weight.mul_(1e36)  # finite weights; the decoder's attention overflows
    with pytest.raises(TrainingError, match=r"^the model's outputs on the validation data are NaN or infinite$"):
        validate(model, cells, torch.device("cpu"))
    with pytest.raises(TrainingError, match=r"^the model's outputs on the validation data became NaN or infinite at "
                                            r"step 7; training stopped .*the last good model is .*m.safetensors"):
        validate(model, cells, torch.device("cpu"), step=7, out_path=tmp_path / "m.safetensors")


def test_a_run_without_fp16_resumes_with_fp16(tmp_path):
    """The saved scaler of a CPU, fp32 or bf16 run is empty; loading it into an enabled fp16 scaler raised
    "The source state dict is empty" (a run started on a CPU, resumed on a GPU without bf16)."""
    from napari_convlora.training.step import restore_scaler as _restore_scaler

    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    _restore_scaler(scaler, saved)
    assert scaler.get_scale() == torch.amp.GradScaler("cpu", enabled=True).get_scale()
    running = torch.amp.GradScaler("cpu", init_scale=8.0, enabled=True)
    running._lazy_init_scale_growth_tracker(torch.device("cpu"))
    _restore_scaler(scaler, running.state_dict())
    assert scaler.get_scale() == 8.0


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_run(tmp_path, tiny_checkpoint, cells):
    out = tmp_path / "m.safetensors"
    left = [tmp_path / ".m.safetensors.abc123.tmp", tmp_path / ".m.training.pt.xyz.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    unrelated = tmp_path / ".other.safetensors.abc.tmp"
    unrelated.write_bytes(b"not ours")
    events, _ = drain(train(tiny_checkpoint, cells, out, _recipe(steps=1, val_every=1), CPU))
    assert "removed 2 temporary file(s) of an interrupted save" in events[0].message
    assert not any(p.exists() for p in left) and unrelated.exists()


def test_the_log_says_which_file_is_which_and_warns_about_thin_validation(tmp_path, tiny_checkpoint, cells):
    out = tmp_path / "m.safetensors"
    events, _ = drain(train(tiny_checkpoint, cells, out, _recipe(steps=6, val_every=2), CPU))
    state = torch.load(state_path(out), map_location="cpu", weights_only=True)
    scores = {step: selection_score(m) for step, m in state["history"]["validation"] if step}
    best_step = max(scores, key=scores.get)  # the first of the best (strictly better replaces)
    assert state["best_step"] == best_step and state["best"] == scores[best_step]
    finished = events[-1].message
    assert f"the best on validation, m.best.safetensors, is from step {best_step}" in finished
    assert any(e.kind == "validation" and "best so far" in e.message for e in events)
    image, labels = synthetic_cells(256, seed=0)
    thin = prepare_training_data([TrainingPair(image, labels)], _recipe(val_fraction=0.02))
    assert thin.validation_pixels().min() < 1000
    events, _ = drain(train(tiny_checkpoint, thin, tmp_path / "t.safetensors", _recipe(val_fraction=0.02, steps=1), CPU))
    assert "validation pixels: its IoU is noisy" in events[0].message


def test_a_binary_task_whose_background_is_the_thin_class_is_pointed_out(tmp_path, tiny_checkpoint):
    """The same sparse labels gave membrane IoU 0.00 or 0.25 depending on which class was declared background."""
    image, _ = synthetic_cells(128, seed=0)
    labels = np.full((128, 128), 2, np.uint8)  # sparse: 1 = background (here thin lines), 2 = the rest
    labels[::16, :], labels[:, ::16] = 1, 1
    recipe = _recipe(label_mode="sparse", background_value=1, steps=1, val_fraction=0.0, input_size=64)
    data = prepare_training_data([TrainingPair(image, labels)], recipe)
    events, _ = drain(train(tiny_checkpoint, data, tmp_path / "m.safetensors", recipe, CPU))
    assert "the background class class 0 (label 1) is only 12 % of the labelled pixels" in events[0].message


def test_sparse_instances_train_and_predict_values_that_copy_back(tmp_path, tiny_checkpoint):
    from napari_convlora.prediction.planes import predict_image

    image, dense = synthetic_cells(128, seed=0)
    labels = np.zeros((128, 128), np.uint16)
    labels[:20][dense[:20] == 0] = 1  # background painted in the top rows only
    labels[dense == 1] = 3  # the nuclei, painted as instances with one id
    recipe = _recipe(label_mode="sparse_instances", steps=2, input_size=64)
    _, model = drain(train(tiny_checkpoint, _prepare_with(image, labels, recipe), tmp_path / "m.safetensors",
                          recipe, CPU))
    assert model.config.head.label_mode == "sparse_instances" and model.config.head.class_values == (1, 2)
    assert set(np.unique(predict_image(model, image, device="cpu").labels)) <= {1, 2}


def _prepare_with(image, labels, recipe):
    return prepare_training_data([TrainingPair(image, labels)], recipe)


# ---- starting a new run from a trained model (init_from) ----------------------------------------------------------
def _source(tmp_path, tiny_checkpoint, cells, name="source.safetensors"):
    """A trained model to start from: 3 steps on the cells."""
    source = tmp_path / name
    drain(train(tiny_checkpoint, cells, source, _recipe(steps=3, val_every=3), CPU))
    return source


def test_a_run_started_from_a_trained_model_starts_with_its_weights(tmp_path, tiny_checkpoint, cells):
    """"Train again" after annotating more: step 0, a new file, the model's weights; the source is only read."""
    from napari_convlora.io.atomic import sha256_file
    from napari_convlora.training.loop import init_recipe

    source = _source(tmp_path, tiny_checkpoint, cells)
    before = source.read_bytes()
    source_state = torch.load(state_path(source), map_location="cpu", weights_only=True)
    recipe, set_aside = init_recipe(source, _recipe(steps=4, val_every=2, input_size=64, lr=1e-3))
    assert set_aside == ["input_size: 64 asked, 128 in the model"]
    assert recipe.input_size == 128 and recipe.lr == 1e-3 and recipe.steps == 4 and recipe.background_value == 0
    data = _prepare(recipe)

    stop = threading.Event()
    stop.set()  # saved before the first step: the weights it starts with
    at_start = tmp_path / "at_start.safetensors"
    events, _ = drain(train(tiny_checkpoint, data, at_start, recipe, CPU, stop=stop, init_from=source))
    assert [e.kind for e in events] == ["start", "validation", "stopped"] and events[-1].step == 0
    assert f"starting from {source}" in events[0].message
    a, b = load_file(str(source)), load_file(str(at_start))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert events[1].metrics == source_state["history"]["validation"][-1][1]  # same data: the source's last score

    again = tmp_path / "again.safetensors"
    events, model = drain(train(tiny_checkpoint, data, again, recipe, CPU, init_from=source))
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3, 4]
    assert events[-1].kind == "finished" and source.read_bytes() == before
    state = torch.load(state_path(again), map_location="cpu", weights_only=True)
    assert state["step"] == 4 and state["started_from"] == {"file_name": source.name, "sha256": sha256_file(source)}
    assert [step for step, _ in state["history"]["validation"]] == [0, 2, 4]
    assert model.config.head == load_model(source, base=tiny_checkpoint).config.head
    with pytest.raises(TrainingError, match=r"source.safetensors: the recipe does not fit the model to start from "
                                            r"\(input_size: 64 asked, 128 in the model\)"):
        asked = _recipe(steps=2, input_size=64)
        drain(train(tiny_checkpoint, _prepare(asked), tmp_path / "x.safetensors", asked, CPU, init_from=source))


def test_a_run_can_start_from_a_bundle_trained_on_the_same_base(tmp_path, tiny_checkpoint, other_tiny_checkpoint,
                                                                 cells):
    from napari_convlora.checkpoints.model_files import save_bundle
    from napari_convlora.training.loop import init_recipe

    source = _source(tmp_path, tiny_checkpoint, cells)
    bundle = save_bundle(load_model(source, base=tiny_checkpoint), tmp_path / "bundle.safetensors")
    recipe, _ = init_recipe(bundle, _recipe(steps=1))
    stop = threading.Event()
    stop.set()
    out = tmp_path / "from_bundle.safetensors"
    drain(train(tiny_checkpoint, _prepare(recipe), out, recipe, CPU, stop=stop, init_from=bundle))
    a, b = load_file(str(source)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match=r"bundle.safetensors: was trained on 'tiny_sam.pth' .* but the base is "
                                              r"'other_sam.pth'"):
        drain(train(other_tiny_checkpoint, _prepare(recipe), out, recipe, CPU, init_from=bundle))


def test_starting_from_a_model_refuses_a_new_class_another_base_and_its_own_files(tmp_path, tiny_checkpoint,
                                                                                   other_tiny_checkpoint, cells):
    from napari_convlora.errors import ConfigError
    from napari_convlora.training.loop import init_recipe

    image, labels = synthetic_cells(128, seed=0)
    two = np.where(labels == 2, 0, labels)  # nuclei only: label values 0, 1
    recipe = _recipe(label_mode="dense", input_size=64, steps=1, val_every=1)
    source = tmp_path / "nuclei.safetensors"
    drain(train(tiny_checkpoint, _prepare_with(image, two, recipe), source, recipe, CPU))
    before = source.read_bytes()
    resolved, _ = init_recipe(source, recipe)
    with pytest.raises(TrainingError, match=r"the model was trained on label values \[0, 1\] but the labels now hold "
                                            r"\[0, 1, 2\]; a new class needs a new training run"):
        drain(train(tiny_checkpoint, _prepare_with(image, labels, resolved), tmp_path / "new.safetensors", resolved,
                   CPU, init_from=source))
    data = _prepare_with(image, two, resolved)
    with pytest.raises(CheckpointError, match=r"nuclei.safetensors: was trained on 'tiny_sam.pth' \(sha256 .*\) but "
                                              r"other_sam.pth has sha256"):
        drain(train(other_tiny_checkpoint, data, tmp_path / "new.safetensors", resolved, CPU, init_from=source))
    best_of_run = tmp_path / "run.best.safetensors"
    best_of_run.write_bytes(before)
    for out, init in ((source, source), (tmp_path / "run.safetensors", best_of_run)):  # out, or its best file
        with pytest.raises(ConfigError, match="is the same file as the model to start from"):
            drain(train(tiny_checkpoint, data, out, resolved, CPU, init_from=init))
        assert init.read_bytes() == before
    with pytest.raises(TrainingError, match=r"trained on label values \[0, 1\] but the labels now hold \[0, 2\]; a new "):
        drain(train(tiny_checkpoint, _prepare_with(image, np.where(labels == 1, 0, labels), resolved),
                   tmp_path / "new.safetensors", resolved, CPU, init_from=source))
    with pytest.raises(ConfigError, match="not both"):
        drain(train(tiny_checkpoint, data, tmp_path / "new.safetensors", resolved, CPU, resume_from=source,
                   init_from=source))
    assert not (tmp_path / "new.safetensors").exists()


# ---- the metrics table beside the model ---------------------------------------------------------------------------
def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_validation_is_a_row_of_the_metrics_csv(tmp_path, tiny_checkpoint, cells):
    from napari_convlora.checkpoints.training_state import metrics_path

    out = tmp_path / "m.safetensors"
    leftover = tmp_path / ".m.metrics.csv.abc123.tmp"  # of a save that was killed
    leftover.write_text("half a table")
    events, _ = drain(train(tiny_checkpoint, cells, out, _recipe(steps=5, val_every=2), CPU))
    assert metrics_path(out) == tmp_path / "m.metrics.csv" and not leftover.exists()
    assert "validation metrics in m.metrics.csv" in events[-1].message
    rows = _csv(metrics_path(out))
    assert list(rows[0]) == ["step", "epoch", "train_loss", "selection_mean_iou", "boundary_iou", "iou_0", "dice_0",
                             "pixels_0", "iou_1", "dice_1", "boundary_iou_1", "pixels_1", "best"]
    validations = [e for e in events if e.kind == "validation"]
    assert [int(r["step"]) for r in rows] == [e.step for e in validations] == [0, 2, 4, 5]
    losses = {e.step: e.loss for e in events if e.kind == "step"}
    for row, event, since in zip(rows, validations, ([], [1, 2], [3, 4], [5])):
        assert float(row["epoch"]) == event.epoch
        assert row["train_loss"] == ("" if not since else repr(float(np.mean([losses[s] for s in since]))))
        assert float(row["selection_mean_iou"]) == selection_score(event.metrics)
        assert float(row["boundary_iou"]) == event.metrics["boundary_iou"] == event.metrics["per_class_boundary_iou"][1]
        assert float(row["boundary_iou_1"]) == event.metrics["boundary_iou"] and 0 <= float(row["boundary_iou"]) <= 1
        for i in range(2):
            assert float(row[f"iou_{i}"]) == event.metrics["per_class_iou"][i]
            assert float(row[f"dice_{i}"]) == event.metrics["per_class_dice"][i]
            assert int(row[f"pixels_{i}"]) == event.metrics["per_class_pixels"][i]
    state = torch.load(state_path(out), map_location="cpu", weights_only=True)
    assert rows[0]["best"] == "0" and [r["step"] for r in rows if r["best"] == "1"][-1] == str(state["best_step"])


def test_a_resumed_run_continues_its_metrics_csv(tmp_path, tiny_checkpoint, cells):
    """Stopped at step 3 and resumed (into the same file and into another): the table is the uninterrupted run's,
    row for row, without a validation twice."""
    from napari_convlora.checkpoints.training_state import metrics_path

    recipe = _recipe(steps=6, val_every=2)
    full = tmp_path / "full.safetensors"
    drain(train(tiny_checkpoint, cells, full, recipe, CPU))
    expected = metrics_path(full).read_text()
    assert [r["step"] for r in _csv(metrics_path(full))] == ["0", "2", "4", "6"]
    for resumed_name in ("part.safetensors", "resumed.safetensors"):
        part = tmp_path / "part.safetensors"
        stop = threading.Event()
        drain(train(tiny_checkpoint, cells, part, recipe, CPU, stop=stop), stop_at=3, stop=stop)
        assert [r["step"] for r in _csv(metrics_path(part))] == ["0", "2"]
        resumed = tmp_path / resumed_name
        drain(train(tiny_checkpoint, cells, resumed, recipe, CPU, resume_from=part))
        assert metrics_path(resumed).read_text() == expected


def test_validation_scores_the_boundaries_of_every_patch(tmp_path, tiny_checkpoint, cells):
    """Boundary IoU of the validation: each patch is an image (HQ-SAM's band on its labelled pixels), the counts
    pooled over the patches; the progress line shows it."""
    import io

    from napari_convlora.boundary import mask_boundary
    from napari_convlora.constants import IGNORE_INDEX
    from napari_convlora.cli.progress import TerminalProgress
    from napari_convlora.training.loop import validate

    stream = io.StringIO()
    progress = TerminalProgress(stream)
    gen = train(tiny_checkpoint, cells, tmp_path / "m.safetensors", _recipe(steps=3, val_every=3), CPU)
    events, model = drain(gen)
    for event in events:
        progress.show(event)
    progress.close()
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("validation at step")]
    assert len(lines) == 2 and all(", boundary IoU " in line for line in lines)
    metrics = validate(model, cells, torch.device("cpu"), batch_size=3)
    inter = union = 0
    for image, target in cells.validation:
        with torch.no_grad():
            pred = model.segment(torch.from_numpy(image[None]))[0].numpy()
        unknown = target == IGNORE_INDEX
        p, t = mask_boundary(pred == 1, unknown=unknown), mask_boundary(target == 1, unknown=unknown)
        inter, union = inter + (p & t).sum(), union + (p | t).sum()
    assert len(cells.validation) > 1 and union > 0
    assert metrics["per_class_boundary_iou"] == [None, pytest.approx(inter / union)]
    assert metrics["boundary_iou"] == pytest.approx(inter / union)
    assert f"boundary IoU {100 * metrics['boundary_iou']:.1f}%" in lines[-1]


def test_a_history_validated_before_boundary_iou_leaves_its_cells_empty():
    from napari_convlora.checkpoints.training_state import metrics_table

    old = {"per_class_iou": [0.9, 0.5, None], "per_class_dice": [0.95, 0.6, None], "per_class_pixels": [10, 5, 0]}
    new = {**old, "per_class_boundary_iou": [None, 0.25, None], "boundary_iou": 0.25}
    header, rows = metrics_table({"validation": [(0, old), (2, new)]}, ["bg", "cell", "rod"], [0, 1, 2], 4)
    assert header == ["step", "epoch", "train_loss", "selection_mean_iou", "boundary_iou", "iou_bg", "dice_bg",
                      "pixels_bg", "iou_cell", "dice_cell", "boundary_iou_cell", "pixels_cell", "iou_rod", "dice_rod",
                      "boundary_iou_rod", "pixels_rod", "best"]
    assert [dict(zip(header, row))["boundary_iou_cell"] for row in rows] == ["", 0.25]
    assert [dict(zip(header, row))["boundary_iou"] for row in rows] == ["", 0.25]
    assert all(len(row) == len(header) and dict(zip(header, row))["boundary_iou_rod"] == "" for row in rows)


def test_a_loaded_base_is_passed_down_instead_of_read_again(tmp_path, tiny_checkpoint, cells, monkeypatch):
    """``train`` takes the ``BaseSam`` a caller has loaded (the dock, a script) and then reads no checkpoint file;
    such runs are reproducible (their adapters start from other random numbers than a run that builds SAM from the
    file first, which draws from the same generator)."""
    from napari_convlora import load_base
    from napari_convlora.training import loop

    recipe = _recipe(steps=2, val_every=2)
    first, second = load_base(tiny_checkpoint), load_base(tiny_checkpoint)
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("the base was read again"))
    _, one = drain(train(first, cells, tmp_path / "one.safetensors", recipe, CPU))
    _, two = drain(train(second, cells, tmp_path / "two.safetensors", recipe, CPU))
    recorded = load_model(tmp_path / "one.safetensors", base=tiny_checkpoint).config.base_checkpoint
    assert recorded is not None and recorded == one.config.base_checkpoint  # the adapter still names its base
    for name, tensor in one.trainable_state_dict().items():
        assert torch.equal(tensor, two.trainable_state_dict()[name]), name


def test_an_optimizer_state_of_another_model_is_refused_in_one_line(tmp_path):
    """An optimizer state from another run ended in torch's own words (issue 21)."""
    from napari_convlora.training.step import restore_optimizer

    def optimizer_of(sizes):
        params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
        optimizer = torch.optim.AdamW(params)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    other, other_schedule = optimizer_of([3, 4, 5])
    mine, schedule = optimizer_of([3, 4])
    state = {"optimizer": other.state_dict(), "scheduler": other_schedule.state_dict()}
    with pytest.raises(TrainingError, match=r"run.safetensors: its training state holds the optimizer of another "
                                            r"model"):
        restore_optimizer(mine, schedule, state, tmp_path / "run.safetensors")


def test_a_detail_head_saved_before_its_context_pyramid_resumes_and_trains_further(tmp_path, tiny_checkpoint, cells,
                                                                                   monkeypatch):
    """A model of the previous version (a detail head without ``detail_context``) keeps its own architecture when
    a run resumes it or starts from it: its weights decide, as for every other field of its head."""
    import dataclasses

    from napari_convlora.training import loop

    recipe = _recipe(steps=4, val_every=2)
    assert recipe.trains_detail_head  # 128 px: the detail head is on
    new_config = loop.model_config_for

    def older(*args, **kwargs):
        config = new_config(*args, **kwargs)
        return dataclasses.replace(config, head=dataclasses.replace(config.head, detail_context=False))

    monkeypatch.setattr(loop, "model_config_for", older)
    part = tmp_path / "older.safetensors"
    stop = threading.Event()
    drain(train(tiny_checkpoint, cells, part, recipe, CPU, stop=stop), stop_at=2, stop=stop)
    monkeypatch.setattr(loop, "model_config_for", new_config)
    assert load_model(part, tiny_checkpoint).detail_head.maps.context is None

    events, model = drain(train(tiny_checkpoint, cells, tmp_path / "resumed.safetensors", recipe, CPU,
                                resume_from=part))
    assert events[-1].kind == "finished" and model.detail_head.maps.context is None
    start, _ = loop.init_recipe(part, recipe)
    events, model = drain(train(tiny_checkpoint, _prepare(start), tmp_path / "again.safetensors", start, CPU,
                                init_from=part))
    assert events[-1].kind == "finished" and model.config.head.detail_context is False
    events, fresh = drain(train(tiny_checkpoint, cells, tmp_path / "fresh.safetensors", recipe, CPU))
    assert fresh.detail_head.maps.context is not None  # a new run gets the pyramid
