"""HQ-SAM: official-format checkpoints load, the promptable HQ decoder equals the reference package, the prompt-free
head's HQ fusion, what each regime trains, parameter counts (METHODS.md 2.1, 2.6) and files that round-trip."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from helpers import images, make_model, perturb_trainable

from napari_convlora import CheckpointError, describe, load_base, load_model, save_adapter, save_bundle
from napari_convlora.config import TINY, HeadConfig, ModelConfig, from_record, to_record
from napari_convlora.errors import ConfigError
from napari_convlora.modeling import Prompts, resize_sam_input
from napari_convlora.modeling.hq import HQParts, hq_parameter_count
from napari_convlora.checkpoints.sam_files import random_sam, save_sam_checkpoint

# ---- sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vit_dim, expected", [(768, 1_071_104), (1024, 1_333_248), (1280, 1_595_392)])
def test_hq_parameter_counts_match_the_paper(vit_dim, expected):
    parts = HQParts(256, vit_dim)
    assert sum(p.numel() for p in parts.parameters()) == expected == hq_parameter_count(256, vit_dim)
    assert expected == 1024 * vit_dim + 284_672  # METHODS.md 2.6.1
    assert len(parts.to_checkpoint_state()) == 25


# ---- loading -------------------------------------------------------------------------------------------


def test_official_format_hq_checkpoint_loads_every_tensor(tiny_hq_checkpoint):
    state = torch.load(tiny_hq_checkpoint, map_location="cpu", weights_only=True)
    base = load_base(tiny_hq_checkpoint)
    assert base.hq is not None and base.architecture == TINY
    loaded = {**base.sam.state_dict(), **base.hq.to_checkpoint_state()}
    assert loaded.keys() == state.keys()  # nothing dropped, nothing made up
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    hq_keys = [k for k in state if k.startswith("mask_decoder.h") or "_feat" in k or "embedding_" in k]
    assert len(hq_keys) == 25


def test_plain_sam_has_no_hq_parts(tiny_checkpoint):
    assert load_base(tiny_checkpoint).hq is None


def test_incomplete_hq_checkpoint_is_refused_naming_the_tensor(tmp_path, tiny_hq_checkpoint):
    state = torch.load(tiny_hq_checkpoint, map_location="cpu", weights_only=True)
    del state["mask_decoder.hf_mlp.layers.2.bias"]
    torch.save(state, tmp_path / "broken_hq.pth")
    with pytest.raises(CheckpointError, match=r"broken_hq\.pth.*mask_decoder\.hf_mlp\.layers\.2\.bias"):
        load_base(tmp_path / "broken_hq.pth")


def test_hq_parts_of_another_width_are_refused(tmp_path):
    sam = random_sam("tiny")
    save_sam_checkpoint(sam, tmp_path / "wrong.pth", hq=HQParts(64, 32))  # encoder is 64 wide
    with pytest.raises(CheckpointError, match="compress_vit_feat.0.weight"):
        load_base(tmp_path / "wrong.pth")


def test_tinyvit_checkpoint_gets_a_clear_refusal(tmp_path):
    state = {"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(1), "image_encoder.layers.0.blocks.0.x": torch.zeros(1),
             "mask_decoder.hf_token.weight": torch.zeros(1, 256)}
    torch.save(state, tmp_path / "sam_hq_vit_tiny.pth")
    with pytest.raises(CheckpointError, match=r"sam_hq_vit_tiny\.pth: .*TinyViT.*segment_anything has no TinyViT"):
        load_base(tmp_path / "sam_hq_vit_tiny.pth")


def test_describe_reports_the_hq_parts(tiny_hq_checkpoint, tiny_checkpoint):
    info = describe(tiny_hq_checkpoint)
    assert info["hq"] == {"parameters": hq_parameter_count(64, 64), "tensors": 25}
    assert describe(tiny_checkpoint)["hq"] is None


# ---- the promptable path against the reference package ----------------------------------------------------


def _reference_sam(checkpoint, image_size):
    """segment-anything-hq's own classes (the PyPI package), built for the tiny geometry (256 px), loaded from the
    file, then given ``image_size`` inputs the way the plugin serves other sizes (``resize_sam_input``: only the
    position embedding and the prompt encoder's sizes change)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pytest.importorskip("segment_anything_hq.modeling")
    from functools import partial

    arch = TINY
    size = arch.image_size
    grid = size // arch.patch_size
    sam = ref.Sam(
        image_encoder=ref.ImageEncoderViT(
            img_size=size, patch_size=arch.patch_size, embed_dim=arch.encoder_embed_dim, depth=arch.encoder_depth,
            num_heads=arch.encoder_num_heads, mlp_ratio=arch.encoder_mlp_ratio, out_chans=arch.prompt_embed_dim,
            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=arch.window_size, global_attn_indexes=arch.encoder_global_attn_indexes),
        prompt_encoder=ref.PromptEncoder(embed_dim=arch.prompt_embed_dim, image_embedding_size=(grid, grid),
                                         input_image_size=(size, size), mask_in_chans=arch.mask_in_chans),
        mask_decoder=ref.MaskDecoderHQ(
            transformer_dim=arch.prompt_embed_dim,
            transformer=ref.TwoWayTransformer(depth=2, embedding_dim=arch.prompt_embed_dim, mlp_dim=arch.decoder_mlp_dim,
                                              num_heads=8),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=arch.iou_head_hidden_dim,
            vit_dim=arch.encoder_embed_dim),
    )
    sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=True)
    resize_sam_input(sam, image_size)
    return sam.eval()


def _prompts(size, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 3
    points = torch.rand(n, 2, 2, generator=g) * size
    labels = torch.tensor([[1, 0], [1, 1], [1, 0]])
    corners = torch.sort(torch.rand(n, 2, 2, generator=g) * size, dim=1).values
    boxes = torch.cat([corners[:, 0], corners[:, 1]], dim=1)
    masks = torch.randn(n, 1, size // 4, size // 4, generator=g) * 4
    return {"points": Prompts(points=points, point_labels=labels), "boxes": Prompts(boxes=boxes),
            "points+boxes+mask": Prompts(points=points, point_labels=labels, boxes=boxes, masks=masks)}[kind]


@pytest.mark.parametrize("input_size", [256, 128, 320])
@pytest.mark.parametrize("kind", ["points", "boxes", "points+boxes+mask"])
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("hq_token_only", [False, True])
def test_promptable_hq_decoder_equals_the_reference(tiny_hq_checkpoint, input_size, kind, multimask, hq_token_only):
    model = make_model(tiny_hq_checkpoint, method="hq", input_size=input_size, hq="sam+hq").eval()
    reference = _reference_sam(tiny_hq_checkpoint, input_size)
    x = images(1, input_size, seed=3)
    prompts = _prompts(input_size, kind)
    with torch.no_grad():
        features = model.encode(x)
        masks, iou = model.prompt_head(features.embedding, prompts, multimask, early=features.early,
                                       hq_token_only=hq_token_only)
        batched = {"image": x[0], "original_size": (input_size, input_size)}
        if prompts.points is not None:
            batched.update(point_coords=prompts.points, point_labels=prompts.point_labels)
        if prompts.boxes is not None:
            batched["boxes"] = prompts.boxes
        if prompts.masks is not None:
            batched["mask_inputs"] = prompts.masks
        expected = reference([batched], multimask_output=multimask, hq_token_only=hq_token_only)[0]
    assert masks.shape == expected["low_res_logits"].shape == (3, 1, input_size // 4, input_size // 4)
    torch.testing.assert_close(masks, expected["low_res_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou, expected["iou_predictions"], rtol=1e-5, atol=1e-5)


def test_hq_mode_of_the_model_decides_the_promptable_default(tiny_hq_checkpoint):
    x = images(1, 128, seed=1)
    prompts = _prompts(128, "boxes")
    outputs = {}
    for mode in ("sam+hq", "hq"):
        model = make_model(tiny_hq_checkpoint, method="hq", input_size=128, hq=mode).eval()
        with torch.no_grad():
            f = model.encode(x)
            outputs[mode] = model.prompt_head(f.embedding, prompts, early=f.early)[0]
            explicit = model.prompt_head(f.embedding, prompts, early=f.early, hq_token_only=mode == "hq")[0]
        assert torch.equal(outputs[mode], explicit)
    assert not torch.allclose(outputs["sam+hq"], outputs["hq"])


# ---- the prompt-free path ----------------------------------------------------------------------------------


def test_prompt_free_sam_plus_hq_is_the_sum_of_its_two_masks(tiny_hq_checkpoint):
    x = images(2, 128, seed=2)
    outputs = {}
    for mode in ("off", "hq", "sam+hq"):
        model = make_model(tiny_hq_checkpoint, num_classes=3, method="lora", input_size=128, hq=mode).eval()
        with torch.no_grad():
            outputs[mode] = model(x).mask_logits
    assert outputs["off"].shape == outputs["hq"].shape == (2, 6, 32, 32)
    torch.testing.assert_close(outputs["sam+hq"], outputs["off"] + outputs["hq"], rtol=1e-5, atol=1e-5)
    assert outputs["hq"].abs().mean() > 1e-3


def test_the_fused_features_reach_the_prompt_free_masks(tiny_hq_checkpoint):
    model = make_model(tiny_hq_checkpoint, method="hq", input_size=128, hq="hq").eval()
    x = images(1, 128, seed=4)
    with torch.no_grad():
        before = model(x).mask_logits.clone()
        for part in (model.hq.compress_vit_feat, model.hq.embedding_encoder, model.hq.embedding_maskfeature):
            part[-1].bias.add_(0.5)
            changed = model(x).mask_logits
            assert not torch.allclose(changed, before)
            before = changed


@pytest.mark.parametrize("input_size", [64, 128, 192, 256, 512])
def test_hq_runs_at_any_input_size(tiny_hq_checkpoint, input_size):
    model = make_model(tiny_hq_checkpoint, num_classes=3, method="conv_lora", input_size=input_size, hq="sam+hq")
    out = model(images(1, input_size))
    assert out.mask_logits.shape == (1, 6, input_size // 4, input_size // 4)


def test_what_each_regime_trains(tiny_hq_checkpoint):
    def trained(method, hq, num_classes=3):
        model = make_model(tiny_hq_checkpoint, num_classes=num_classes, method=method, input_size=128, hq=hq)
        ids = {id(p) for p in model.trainable_parameters()}
        return model, {n for n, p in model.named_parameters() if id(p) in ids}

    model, names = trained("hq", "sam+hq")
    assert {n for n in names if n.startswith("hq.")} == {n for n, _ in model.hq.named_parameters(prefix="hq")}
    assert not any(n.startswith("sam.") for n in names)  # SAM entirely frozen, as HQ-SAM trains
    assert {n for n in names if n.startswith("head.")} == {"head.mask_tokens.weight", "head.class_head.weight",
                                                            "head.class_head.bias"}
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    _, binary = trained("hq", "hq", num_classes=2)
    assert {n for n in binary if n.startswith("head.")} == {"head.mask_tokens.weight"}
    _, combined = trained("conv_lora", "sam+hq")
    assert any("lora_A" in n for n in combined) and any(n.startswith("hq.") for n in combined)
    assert "sam.mask_decoder.iou_token.weight" in combined  # the decoder trains as Conv-LoRA's recipe does
    _, plain = trained("conv_lora", "off")
    assert not any(n.startswith("hq.") for n in plain)


def test_hq_training_moves_only_the_trainable_tensors(tiny_hq_checkpoint):
    model = make_model(tiny_hq_checkpoint, num_classes=2, method="hq", input_size=128, hq="hq")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    out = model(images(2, 128))
    out.mask_logits.square().mean().backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, frozen[k])}
    assert changed and all(k.startswith(("hq.", "head.")) for k in changed)
    assert "hq.hf_token.weight" not in changed  # the prompt-free head's own tokens play the HQ token's part


def test_a_plain_sam_gets_new_hq_parts_and_a_method_hq_needs_them(tiny_checkpoint):
    model = make_model(tiny_checkpoint, method="hq", input_size=128, hq="sam+hq")
    assert model.hq is not None
    with pytest.raises(ConfigError, match="method 'hq'"):
        make_model(tiny_checkpoint, method="hq", input_size=128)


# ---- files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, hq", [("hq", "sam+hq"), ("conv_lora", "hq"), ("decoder", "sam+hq")])
@pytest.mark.parametrize("on_hq_base", [True, False])
def test_hq_adapters_and_bundles_round_trip(tmp_path, tiny_hq_checkpoint, tiny_checkpoint, method, hq, on_hq_base):
    base = tiny_hq_checkpoint if on_hq_base else tiny_checkpoint
    model = perturb_trainable(make_model(base, num_classes=3, method=method, input_size=128, hq=hq), 0.1).eval()
    x = images(2, 128, seed=5)
    with torch.no_grad():
        expected = model.class_probabilities(x)
    adapter = save_adapter(model, tmp_path / "a.safetensors")
    bundle = save_bundle(model, tmp_path / "b.safetensors")
    assert describe(adapter)["config"]["base_checkpoint"]["file_name"] == base.name
    for path, b in ((adapter, base), (bundle, None)):
        loaded = load_model(path, base=b)
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded.class_probabilities(x), expected)
            f, g = loaded.encode(x[:1]), model.encode(x[:1])
            prompts = _prompts(128, "boxes")
            assert torch.equal(loaded.prompt_head(f.embedding, prompts, early=f.early)[0],
                               model.prompt_head(g.embedding, prompts, early=g.early)[0])


def test_records_written_before_hq_existed_still_load(tiny_checkpoint):
    config = make_model(tiny_checkpoint, method="lora", input_size=128).config
    record = to_record(config)
    del record["head"]["hq"]  # as a file of version 0.2 holds it
    assert from_record(ModelConfig, record, "old.safetensors", "config").head.hq == "off"
    del record["head"]["num_classes"]  # a key that was always there stays required
    with pytest.raises(ConfigError, match="config.head.num_classes"):
        from_record(ModelConfig, record, "old.safetensors", "config")


def test_head_config_refuses_an_unknown_hq_mode():
    with pytest.raises(ConfigError, match="HQ mode"):
        dataclasses.replace(HeadConfig(), hq="sometimes")


# ---- command line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, hq_option, used", [("hq", [], "sam+hq"), ("conv_lora", ["--hq", "hq"], "hq"),
                                                     ("lora", [], "off")])
def test_cli_trains_and_predicts_on_an_hq_checkpoint(tmp_path, tiny_hq_checkpoint, capsys, method, hq_option, used):
    import tifffile

    from napari_convlora.cli import main
    from napari_convlora.data.samples import synthetic_cells

    image, labels = synthetic_cells(128, seed=0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    model = tmp_path / "m.safetensors"
    code = main(["train", "--checkpoint", str(tiny_hq_checkpoint), "--image", str(tmp_path / "img.tif"), "--labels",
                 str(tmp_path / "lab.tif"), "--out", str(model), "--input-size", "64", "--steps", "2",
                 "--method", method, *hq_option, "--device", "cpu", "--grad-accum", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert ("HQ parts are not used" in err) == (used == "off")
    assert load_model(model, base=tiny_hq_checkpoint).config.head.hq == used
    code = main(["predict", "--model", str(model), "--checkpoint", str(tiny_hq_checkpoint), "--image",
                 str(tmp_path / "img.tif"), "--out", str(tmp_path / "pred.tif"), "--device", "cpu"])
    assert code == 0 and tifffile.imread(tmp_path / "pred.tif").shape == (128, 128)
    capsys.readouterr()
    assert main(["info", str(tiny_hq_checkpoint)]) == 0
    assert json.loads(capsys.readouterr().out)["hq"]["tensors"] == 25


def test_the_hq_step_benchmark_runs(tmp_path):
    """benchmarks/bench_hq_step.py end to end on the tiny geometry (what the GPU suite runs on vit_l)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_hq_step

    assert bench_hq_step.main(["--model-type", "tiny", "--sizes", "64", "--steps", "2", "--warmup", "1",
                               "--json", str(tmp_path / "hq.json")]) == 0
    results = json.loads((tmp_path / "hq.json").read_text())["results"]
    assert [r["pair"] for r in results] == ["conv_lora", "hq_vs_decoder"]
    assert all(r["paired_ratio"] > 0 for r in results)
    assert results[1]["trainable_with"] == hq_parameter_count(64, 64) + 64  # HQ parts + the binary head's token


def test_activation_checkpointing_keeps_hq_gradients(tiny_hq_checkpoint):
    """The early feature is hooked on a block that checkpointing wraps: the same loss and gradients either way."""
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)  # the same adapter initialisation, gate noise and new HQ parts
        model = make_model(tiny_hq_checkpoint, num_classes=3, method="conv_lora", input_size=128, hq="sam+hq")
        model.set_activation_checkpointing(checkpointed)
        model(images(2, 128)).mask_logits.square().mean().backward()
        grads.append({n.replace(".block.", "."): p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})  # the wrapper adds ".block." to the names of the blocks' parameters
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("hq.compress_vit_feat") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
