"""WeSAM's self-training loop on a tiny SAM: the anchor is the loaded SAM exactly, only the adapters change, the views
keep prompts aligned with the image, and a run saves an adapter that records it is promptable."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from helpers import drain

from napari_convlora import load_model, load_sam
from napari_convlora.config import RunOptions
from napari_convlora.config.self_training import SelfTrainingRecipe
from napari_convlora.errors import ConfigError
from napari_convlora.data.prompts import mask_box
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.self_training import WeakPair, prepare_weak_data, self_train
from napari_convlora.self_training.crops import CropPrompt, CropSampler, prompt_groups
from napari_convlora.self_training.loop import _flip_prompts, step_loss
from napari_convlora.self_training.views import Flips, strong_view
from napari_convlora.weak import WeakLabels, WeakObject, weak_labels_from_coarse_labels

CPU = RunOptions(device="cpu")


def _cells(seed=0, size=160):
    image, labels = synthetic_cells(size, seed=seed)
    from skimage.measure import label

    return image, label(labels > 0)


def _box_pairs(n=2, coarse=False):
    pairs = []
    for seed in range(n):
        image, instances = _cells(seed)
        if coarse:
            weak = weak_labels_from_coarse_labels(instances, layer="coarse")
        else:
            objects = [WeakObject((), "box", box=mask_box(instances == i), layer="boxes", source=f"object {i}")
                       for i in np.unique(instances) if i > 0]
            weak = WeakLabels(instances.shape, {(): objects})
        pairs.append(WeakPair(image, weak.with_evaluation_labels(instances), name=f"cells {seed}"))
    return pairs


def _recipe(**kw):
    base = dict(input_size=128, steps=4, warmup_steps=0, lr=1e-2, val_every=2, seed=0)
    base.update(kw)
    return SelfTrainingRecipe(**base)


def test_a_run_trains_only_the_adapters_and_records_that_it_is_promptable(tmp_path, tiny_checkpoint):
    data = prepare_weak_data(_box_pairs(), _recipe())
    out = tmp_path / "adapted.safetensors"
    events, model = drain(self_train(tiny_checkpoint, data, out, _recipe(), CPU))
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished" and kinds.count("step") == 4
    steps = [e for e in events if e.kind == "step"]
    assert set(steps[0].parts) == {"focal", "dice", "iou_mse", "anchor", "contrastive"}
    assert [e.step for e in events if e.kind == "validation"] == [0, 2, 4]
    sam = load_sam(tiny_checkpoint)
    trained = {name for name, _ in model.named_parameters() if "lora_" in name}
    assert trained and {n for n, p in model.named_parameters() if p.requires_grad} == trained
    for name, tensor in sam.state_dict().items():  # SAM's own weights (decoder included) are as loaded
        mine = model.sam.state_dict()[name.replace("attn.qkv.", "attn.qkv.base_layer.")
                                      if name.replace("attn.qkv.", "attn.qkv.base_layer.") in model.sam.state_dict()
                                      else name]
        if "pos_embed" not in name:
            assert torch.equal(mine, tensor), name
    loaded = load_model(out, base=tiny_checkpoint)
    record = loaded.config.promptable
    assert record is not None and record.weak_labels == ("box",) and record.steps == 4
    assert record.before["objects"] > 0 and record.after["prompt_miou"] >= 0
    assert set(loaded.trainable_state_dict()) == {n for n in model.trainable_state_dict()}
    assert all("lora_" in k for k in loaded.trainable_state_dict())


def test_the_anchor_is_the_loaded_sam(tiny_checkpoint):
    """The anchor branch is the adapted model with its adapters off: SAM exactly as loaded, no second copy."""
    from helpers import make_model, perturb_trainable

    from napari_convlora.config import wesam_adapter
    from napari_convlora.modeling import set_fast_attention

    model = make_model(tiny_checkpoint, input_size=256, **{k: v for k, v in vars(wesam_adapter()).items()
                                                           if k in ("method", "rank", "alpha", "qkv_slices")})
    perturb_trainable(model, scale=0.5)  # adapters now change the encoder
    sam = load_sam(tiny_checkpoint)
    set_fast_attention(sam, "auto")  # the attention the model computes with
    x = torch.rand(1, 3, 256, 256) * 255
    with torch.no_grad():
        plain = sam.image_encoder((x - sam.pixel_mean) / sam.pixel_std)
        adapted = model.encode(x).embedding
        model.set_adapters_enabled(False)
        anchor = model.encode(x).embedding
    assert not torch.allclose(adapted, plain)
    assert torch.equal(anchor, plain)


def test_views_keep_prompts_on_their_objects():
    """Flipping the image flips boxes and points the same way (pixel for pixel); the strong view is photometric."""
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.float32)
    image[10:20, 30:50] = 200.0
    prompt = CropPrompt("box", np.array([30, 10, 50, 20], np.float32), np.array([[30.5, 10.5]], np.float32))
    for flips in (Flips(True, False), Flips(False, True), Flips(True, True)):
        flipped = flips.image(image)
        (moved,) = _flip_prompts([prompt], flips, 64)
        x0, y0, x1, y1 = moved.box.astype(int)
        assert (flipped[y0:y1, x0:x1] == 200).all() and flipped.sum() == image.sum()
        x, y = moved.positive[0]
        assert flipped[int(y), int(x), 0] == 200
    valid = np.zeros((64, 64), bool)
    valid[:, :40] = True
    for seed in range(10):
        strong = strong_view(image, np.random.default_rng(seed), valid)
        assert strong.shape == image.shape and (strong[:, 40:] == 0).all() and strong.min() >= 0 and strong.max() <= 255
    assert rng is not None


def test_crops_take_every_object_in_them_and_draw_points_afresh_in_coarse_masks():
    image, instances = _cells(0)
    weak = weak_labels_from_coarse_labels(instances, layer="coarse")
    plane = np.repeat(image[..., None].astype(np.float32), 3, axis=-1) / image.max() * 255
    sampler = CropSampler([plane], [weak.on_plane(())], 128, max_objects=3, positive=5, negative=5)
    rng = np.random.default_rng(0)
    first, second = sampler.crop_at(0, 0, 0, rng), sampler.crop_at(0, 0, 0, rng)
    assert len(first.prompts) == 3 and first.image.shape == (128, 128, 3)
    assert all(len(p.positive) == 5 and len(p.negative) <= 5 for p in first.prompts)
    assert not all(np.array_equal(a.positive, b.positive) for a, b in zip(first.prompts, second.prompts))
    groups = prompt_groups(first.prompts + [CropPrompt("box", np.array([1, 1, 9, 9], np.float32))])
    assert sorted(len(indices) for indices, _ in groups) == [1, 3]
    (_, with_points), = [g for g in groups if g[1]["points"] is not None]
    assert with_points["points"].shape[0] == 3 and set(np.unique(with_points["labels"])) <= {-1, 0, 1}


def test_step_loss_gives_gradients_to_the_adapters_only(tiny_checkpoint):
    from napari_convlora.checkpoints.sam_files import load_base
    from napari_convlora.self_training.loop import model_config_for
    from napari_convlora.modeling import AdaptedSAM

    recipe = _recipe()
    data = prepare_weak_data(_box_pairs(1), recipe)
    base = load_base(tiny_checkpoint)
    model = AdaptedSAM.from_base(base, model_config_for(base, recipe, data))
    sampler = CropSampler(data.planes, data.objects, 128)
    rng = np.random.default_rng(1)
    losses = step_loss(model, sampler.sample(rng), recipe, rng, torch.device("cpu"))
    losses["total"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_B" in n or "lora_A" in n for n in with_grad)
    assert torch.isfinite(losses["total"])


def test_stop_saves_and_bad_input_is_refused(tmp_path, tiny_checkpoint):
    data = prepare_weak_data(_box_pairs(1), _recipe(steps=6, val_every=100))
    stop = threading.Event()
    out = tmp_path / "stopped.safetensors"
    events, _ = drain(self_train(tiny_checkpoint, data, out, _recipe(steps=6, val_every=100), CPU, stop=stop),
                     stop_at=2, stop=stop)
    assert events[-1].kind == "stopped" and events[-1].step == 2 and out.exists()
    assert load_model(out, base=tiny_checkpoint).config.promptable.steps == 2
    image, instances = _cells(0)
    with pytest.raises(ConfigError, match="no weak label"):
        prepare_weak_data([WeakPair(image, WeakLabels(instances.shape, {}))], _recipe())
    with pytest.raises(ConfigError, match="differs from its weak labels"):
        prepare_weak_data([WeakPair(image[:100], _box_pairs(1)[0].weak, name="cropped")], _recipe())
    with pytest.raises(ConfigError, match="method 'lora' or 'conv_lora'"):
        SelfTrainingRecipe(adapter=__import__("napari_convlora.config", fromlist=["AdapterConfig"]).AdapterConfig(
            method="decoder"))


# ---- command line ------------------------------------------------------------------------------------------


def _napari_shapes_csv(path, boxes):
    """Rectangles as napari's Shapes writer saves them: index, shape-type, vertex-index, axis-0 (row), axis-1."""
    rows = ["index,shape-type,vertex-index,axis-0,axis-1"]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        corners = [(y0, x0), (y0, x1 - 1), (y1 - 1, x1 - 1), (y1 - 1, x0)]  # napari: pixel centres on integers
        rows += [f"{i},rectangle,{v},{r},{c}" for v, (r, c) in enumerate(corners)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _napari_points_csv(path, points):
    rows = ["index,axis-0,axis-1,label"] + [f"{i},{y},{x},{label}" for i, (x, y, label) in enumerate(points)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_adapts_from_napari_csv_files_and_a_coarse_label_image(tmp_path, tiny_checkpoint, capsys):
    import tifffile

    from napari_convlora.cli import main

    image, instances = _cells(0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "gt.tif", instances.astype(np.uint16))
    tifffile.imwrite(tmp_path / "coarse.tif", instances.astype(np.uint16))
    ids = [i for i in np.unique(instances) if i > 0][:6]
    boxes = _napari_shapes_csv(tmp_path / "boxes.csv", [mask_box(instances == i).astype(int) for i in ids])
    ys, xs = np.nonzero(instances == ids[0])
    points = _napari_points_csv(tmp_path / "points.csv", [(xs[0], ys[0], True), (0, 0, False)])
    out = tmp_path / "adapted.safetensors"
    code = main(["adapt", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.tif"),
                 "--image", str(tmp_path / "img.tif"), "--boxes", str(boxes), "--boxes", "-",
                 "--points", str(points), "--points", "-", "--coarse", "-", "--coarse", str(tmp_path / "coarse.tif"),
                 "--eval-labels", str(tmp_path / "gt.tif"), "--eval-labels", "-", "--out", str(out),
                 "--input-size", "64", "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "prompt mIoU" in err and "finished 2 steps" in err
    record = load_model(out, base=tiny_checkpoint).config.promptable
    assert record.weak_labels == ("box", "points", "coarse") and record.before is not None


def test_cli_adapt_refuses_bad_input_in_one_line(tmp_path, tiny_checkpoint, capsys):
    import tifffile

    from napari_convlora.cli import main

    image, instances = _cells(0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    points = _napari_points_csv(tmp_path / "negatives.csv", [(5, 5, False), (9, 9, False)])
    boxes = _napari_shapes_csv(tmp_path / "boxes.csv", [(10, 10, 30, 30)])
    base = ["adapt", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.tif"), "--out",
            str(tmp_path / "a.safetensors"), "--steps", "1", "--input-size", "64", "--device", "cpu"]
    cases = [
        ([], "has no weak labels"),
        (["--boxes", str(boxes), "--boxes", str(boxes)], "2 --boxes for 1 --image"),
        (["--points", str(points)], "no positive point"),
        (["--boxes", str(points)], "negatives.csv"),
        (["--boxes", str(tmp_path / "missing.csv")], "missing.csv"),
        (["--boxes", str(boxes), "--steps", "0"], "--steps 0"),  # not read as "not given" (the default 500)
        (["--boxes", str(boxes), "--steps", "-2"], "--steps -2"),
        (["--boxes", str(boxes), "--steps", "0", "--resume", str(tmp_path / "a.safetensors")], "--steps 0"),
    ]
    for extra, message in cases:
        code = main(base + extra)
        err = capsys.readouterr().err
        assert code in (1, 2) and message in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("warmup", [0, 250])  # 250: scaled to 3 steps for this 6-step run, before and after
def test_stop_and_resume_equal_an_uninterrupted_run(tmp_path, tiny_checkpoint, warmup):
    from safetensors.torch import load_file

    from napari_convlora.self_training.loop import resume_self_training_recipe

    recipe = _recipe(steps=6, val_every=4, warmup_steps=warmup)
    data = prepare_weak_data(_box_pairs(1), recipe)
    full = tmp_path / "full.safetensors"
    drain(self_train(tiny_checkpoint, data, full, recipe, CPU))
    part = tmp_path / "part.safetensors"
    stop = threading.Event()
    events, _ = drain(self_train(tiny_checkpoint, data, part, recipe, CPU, stop=stop), stop_at=3, stop=stop)
    assert events[-1].kind == "stopped" and events[-1].step == 3
    saved = resume_self_training_recipe(part)
    assert saved == recipe.for_new_run()  # the warm-up the run made is the one saved
    resumed = tmp_path / "resumed.safetensors"
    events, _ = drain(self_train(tiny_checkpoint, data, resumed, saved, CPU, resume_from=part))
    assert [e.step for e in events if e.kind == "step"] == [4, 5, 6]
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(resumed, base=tiny_checkpoint).config.promptable == load_model(full, base=tiny_checkpoint
                                                                                     ).config.promptable


def test_a_supervised_run_cannot_resume_a_self_training_state(tmp_path, tiny_checkpoint):
    from napari_convlora import CheckpointError
    from napari_convlora.training.loop import resume_recipe

    recipe = _recipe(steps=1)
    out = tmp_path / "weak.safetensors"
    drain(self_train(tiny_checkpoint, prepare_weak_data(_box_pairs(1), recipe), out, recipe, CPU))
    with pytest.raises(CheckpointError, match="another kind of run.*adapt --resume"):
        resume_recipe(out)


def test_cli_resumes_and_segments_prompts_with_and_without_the_adapters(tmp_path, tiny_checkpoint, capsys):
    import tifffile

    from napari_convlora.cli import main

    image, instances = _cells(0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    ids = [i for i in np.unique(instances) if i > 0][:5]
    boxes = _napari_shapes_csv(tmp_path / "boxes.csv", [mask_box(instances == i).astype(int) for i in ids])
    out = tmp_path / "adapted.safetensors"
    common = ["--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.tif"), "--boxes", str(boxes),
              "--out", str(out), "--input-size", "64", "--device", "cpu"]
    assert main(["adapt", *common, "--steps", "2"]) == 0
    assert main(["adapt", *common, "--steps", "3", "--resume", str(out)]) == 0  # continued in place
    assert "resuming" in capsys.readouterr().err
    resumed = tmp_path / "resumed.safetensors"
    common[common.index(str(out))] = str(resumed)
    assert main(["adapt", *common, "--steps", "4", "--resume", str(out)]) == 0  # or into another file
    assert load_model(out, base=tiny_checkpoint).config.promptable.steps == 3
    assert load_model(resumed, base=tiny_checkpoint).config.promptable.steps == 4
    for extra, name in (([], "instances.tif"), (["--unadapted"], "unadapted.tif")):
        code = main(["segment-prompts", "--model", str(resumed), "--checkpoint", str(tiny_checkpoint), "--image",
                     str(tmp_path / "img.tif"), "--boxes", str(boxes), "--out", str(tmp_path / name),
                     "--device", "cpu", *extra])
        assert code == 0, capsys.readouterr().err
        labels = tifffile.imread(tmp_path / name)
        assert labels.shape == instances.shape and labels.max() <= len(ids)
    assert "5 objects" in capsys.readouterr().out


def test_a_promptable_model_is_not_used_as_a_prompt_free_one(tmp_path, tiny_checkpoint):
    """Predicting without prompts, or continuing supervised training from it, would use a head that never trained."""
    from napari_convlora import CheckpointError
    from napari_convlora.prediction.planes import predict_image
    from napari_convlora.training.loop import init_recipe

    recipe = _recipe(steps=1)
    out = tmp_path / "weak.safetensors"
    _, model = drain(self_train(tiny_checkpoint, prepare_weak_data(_box_pairs(1), recipe), out, recipe, CPU))
    with pytest.raises(ValueError, match="adapted to segment prompts.*segment-prompts"):
        predict_image(model, _cells(0)[0], device="cpu")
    with pytest.raises(CheckpointError, match="adapted to segment prompts.*start from the base SAM"):
        init_recipe(out)


def test_a_nan_loss_stops_without_saving_it(tmp_path, tiny_checkpoint, monkeypatch):
    from napari_convlora import TrainingError
    from napari_convlora.self_training import loop

    recipe = _recipe(steps=4, val_every=2)
    data = prepare_weak_data(_box_pairs(1), recipe)
    real = loop.wesam_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(loop, "wesam_loss", poisoned)
    out = tmp_path / "nan.safetensors"
    with pytest.raises(TrainingError, match="the loss became nan at step 3.*last good model is"):
        drain(self_train(tiny_checkpoint, data, out, recipe, CPU))
    saved = load_model(out, base=tiny_checkpoint)
    assert saved.config.promptable.steps == 2 and all(torch.isfinite(t).all() for t in saved.state_dict().values())


def test_weights_that_become_non_finite_stop_the_run_before_they_are_saved(tmp_path, tiny_checkpoint, monkeypatch):
    """The finite-weights check of the shared step: the loss was still finite, the update made the weights
    infinite; the save of that step must not happen (the old loop saved them)."""
    from napari_convlora import TrainingError

    recipe = _recipe(steps=4, val_every=1)
    data = prepare_weak_data(_box_pairs(1), recipe)
    out = tmp_path / "diverged.safetensors"
    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def diverging_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", diverging_step)
    with pytest.raises(TrainingError, match=r"weights became NaN or infinite .* at step 2; .*last good model is"):
        drain(self_train(tiny_checkpoint, data, out, recipe, CPU))
    saved = load_model(out, base=tiny_checkpoint)
    assert saved.config.promptable.steps == 1
    assert all(torch.isfinite(t).all() for t in saved.trainable_state_dict().values())


def test_the_loss_scale_is_saved_with_the_run_and_restored_on_resume(tmp_path, tiny_checkpoint, monkeypatch):
    """Self-training shares supervised training's step, fp16 loss scaler included: its state goes into the training
    state and comes back on resume (the old loop had no scaler)."""
    from napari_convlora.checkpoints.training_state import load_training_state, state_path
    from napari_convlora.training.step import TrainingStep

    recipe = _recipe(steps=2, val_every=2)
    data = prepare_weak_data(_box_pairs(1), recipe)
    out = tmp_path / "scaled.safetensors"
    drain(self_train(tiny_checkpoint, data, out, recipe, CPU))
    state, _ = load_training_state(state_path(out), SelfTrainingRecipe)
    assert "scaler" in state
    restored = []
    monkeypatch.setattr(TrainingStep, "restore_scaler", lambda self, saved: restored.append(saved))
    drain(self_train(tiny_checkpoint, data, out, _recipe(steps=3, val_every=2), CPU, resume_from=out))
    assert restored == [state["scaler"]]


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradient_clipping_is_a_recipe_field_off_by_default_as_in_wesam(tmp_path, tiny_checkpoint, monkeypatch, clip):
    assert SelfTrainingRecipe().grad_clip is None  # WeSAM's released code does not clip
    with pytest.raises(ConfigError, match="grad_clip must be > 0"):
        _recipe(grad_clip=0.0)
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **k: norms.append(max_norm)
                        or real(params, max_norm, *a, **k))
    recipe = _recipe(steps=2, grad_clip=clip)
    drain(self_train(tiny_checkpoint, prepare_weak_data(_box_pairs(1), recipe), tmp_path / "c.safetensors", recipe,
                     CPU))
    assert norms == ([] if clip is None else [clip, clip])


def test_both_loops_take_their_steps_through_the_shared_step(tmp_path, tiny_checkpoint, monkeypatch):
    from napari_convlora.config import TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.training import train
    from napari_convlora.training.step import TrainingStep

    finished = []
    real = TrainingStep.finish
    monkeypatch.setattr(TrainingStep, "finish", lambda self, step: finished.append(step) or real(self, step))
    recipe = _recipe(steps=2)
    drain(self_train(tiny_checkpoint, prepare_weak_data(_box_pairs(1), recipe), tmp_path / "w.safetensors", recipe,
                     CPU))
    assert finished == [1, 2]
    image, labels = synthetic_cells(128, seed=0)
    supervised = TrainRecipe(input_size=128, label_mode="instances", val_fraction=0.2, steps=3, batch_size=2)
    data = prepare_training_data([TrainingPair(image, labels)], supervised)
    drain(train(tiny_checkpoint, data, tmp_path / "s.safetensors", run=CPU))
    assert finished[2:] == [1, 2, 3]


def test_a_shortened_warm_up_is_announced_at_the_start_and_the_run_ends_at_the_full_rate(tmp_path, tiny_checkpoint):
    recipe = _recipe(steps=4, warmup_steps=250, val_every=100)
    events, _ = drain(self_train(tiny_checkpoint, prepare_weak_data(_box_pairs(1), recipe), tmp_path / "w.safetensors",
                                 recipe, CPU))
    assert events[0].kind == "start" and "warm-up 250 -> 2 steps for a 4-step run" in events[0].message
    assert [e.lr for e in events if e.kind == "step"][-1] == recipe.lr  # not 4/250 of it
    events, _ = drain(self_train(tiny_checkpoint, prepare_weak_data(_box_pairs(1), _recipe(steps=1)),
                                 tmp_path / "n.safetensors", _recipe(steps=1), CPU))
    assert "warm-up" not in events[0].message  # nothing shortened, nothing said


def test_a_short_run_continued_for_more_steps_keeps_its_warm_up(tmp_path, tiny_checkpoint):
    """The saved recipe holds the warm-up the run made: continued for longer, it does not ramp up again."""
    import dataclasses

    from napari_convlora.self_training.loop import resume_self_training_recipe

    recipe = _recipe(steps=4, warmup_steps=250, val_every=100)
    data = prepare_weak_data(_box_pairs(1), recipe)
    first = tmp_path / "w.safetensors"
    drain(self_train(tiny_checkpoint, data, first, recipe, CPU))
    longer = dataclasses.replace(resume_self_training_recipe(first), steps=8)
    assert longer.warmup_steps == 2
    events, _ = drain(self_train(tiny_checkpoint, data, tmp_path / "x.safetensors", longer, CPU, resume_from=first))
    assert "warm-up" not in events[0].message
    assert [e.lr for e in events if e.kind == "step"] == [recipe.lr] * 4


def test_finite_weights_whose_prompt_outputs_are_nan_are_never_saved(tmp_path, tiny_checkpoint, monkeypatch):
    """The "last good" model must give finite outputs, not only hold finite weights (issue 21, as for supervised
    training): the outputs on the step's crop are checked before each save."""
    from napari_convlora import TrainingError
    from napari_convlora.self_training import loop

    recipe = _recipe(steps=4, val_every=2)
    data = prepare_weak_data(_box_pairs(1), recipe)
    real_step, real_decode = torch.optim.Adam.step, loop.decode_prompts
    updates = {"n": 0}

    def counting_step(self, *args, **kwargs):
        updates["n"] += 1
        return real_step(self, *args, **kwargs)

    def broken_after_step_one(model, *args, **kwargs):  # the model's outputs go NaN, its weights stay finite
        low, iou = real_decode(model, *args, **kwargs)
        if updates["n"] >= 1 and not model.training:
            return low * float("nan"), iou
        return low, iou

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    monkeypatch.setattr(loop, "decode_prompts", broken_after_step_one)
    out = tmp_path / "nan_out.safetensors"
    with pytest.raises(TrainingError, match=r"the model's outputs became NaN or infinite at step 2; .*nothing was "
                                            r"saved yet"):
        drain(self_train(tiny_checkpoint, data, out, recipe, CPU))
    assert not out.exists()
