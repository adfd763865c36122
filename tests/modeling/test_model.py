"""AdaptedSAM: SAM stays SAM, identity at init, trainable set, parameter counts, heads, adapter switches."""

from __future__ import annotations

import pytest
import torch
from helpers import images, make_model, perturb_trainable

from napari_convlora import load_base, load_sam, random_base
from napari_convlora.adapters.inject import adapter_layers, inject_adapters, remove_adapters
from napari_convlora.adapters.layers import ConvLoRALinear, LoRALinear
from napari_convlora.config import AdapterConfig
from napari_convlora.modeling import Prompts, SegmentationOutput, resize_sam_input, set_fast_attention
from napari_convlora.modeling.resize import RESIZED_ATTRIBUTES

METHODS = ["conv_lora", "lora", "decoder"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [256, 128])
def test_encoder_equals_plain_sam_right_after_adapters(tiny_checkpoint, method, size):
    plain = load_sam(tiny_checkpoint)
    resize_sam_input(plain, size)
    set_fast_attention(plain, "auto")  # the attention the model computes with (the same numbers either way)
    model = make_model(tiny_checkpoint, num_classes=3, method=method, input_size=size).eval()
    x = images(2, size)
    with torch.no_grad():
        expected = plain.image_encoder((x - plain.pixel_mean) / plain.pixel_std)
        got = model.encode(x).embedding
    assert torch.equal(got, expected)


def _walk(sam: torch.nn.Module) -> dict[str, tuple]:
    """Every module of a SAM: (the module, its plain attributes, its parameters, its buffers), by name."""
    record = {}
    for name, module in sam.named_modules():
        attributes = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        record[name] = (module, attributes, dict(module._parameters), {k: v.clone() for k, v in module._buffers.items()})
    return record


@pytest.mark.parametrize("method", METHODS)
def test_sam_stays_sam(tiny_checkpoint, method):
    """Building the model changes no attribute, parameter or buffer of SAM's modules except what
    ``resize_sam_input`` must change, and adapters only wrap the target Linear layers (kept as base_layer); the
    runtime switches (checkpointing, fast attention, the early-feature hook) leave nothing once off."""
    base = load_base(tiny_checkpoint)
    before = _walk(base.sam)
    model = make_model(base, num_classes=4, method=method, input_size=128)
    model.set_activation_checkpointing(True)
    model.set_activation_checkpointing(False)
    model.set_fast_attention("on")  # a forward bound on SAM's Attention modules while on
    model.capture_early_feature(True)
    model(images(1, 128))
    model.capture_early_feature(False)
    model.set_fast_attention("off")  # "off" takes it away again
    assert model.sam is base.sam
    allowed = {(f"{path}", attribute) for path, attribute in RESIZED_ATTRIBUTES}
    wrapped = {f"image_encoder.{name}" for name in model.adapted_layers}
    for name, (module, attributes, parameters, buffers) in before.items():
        now = model.sam.get_submodule(name + ".base_layer" if name in wrapped else name) if name else model.sam
        assert now is module, name
        for key, value in attributes.items():
            if (name, key) not in allowed:
                assert vars(module)[key] == value, f"{name}.{key} changed"
        assert set(vars(module)) - {"_forward_hooks_with_kwargs"} <= set(attributes) | {
            k for k in vars(module) if k.startswith("_")}, f"{name} got new attributes"
        for key, value in parameters.items():
            if (name, key) not in allowed:
                assert module._parameters[key] is value, f"{name}.{key} replaced"
        for key, value in buffers.items():
            assert torch.equal(module._buffers[key], value), f"{name}.{key} changed"
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name}"
    decoder = model.sam.mask_decoder
    assert decoder.num_mask_tokens == 4 and decoder.mask_tokens.weight.shape[0] == 4
    assert len(decoder.output_hypernetworks_mlps) == 4


def test_promptable_head_reproduces_sams_own_forward(tiny_checkpoint):
    """SAM's promptable decoding on the adapted encoder: the prompt head gives what segment_anything's own
    ``Sam.forward`` gives on the same (adapted, perturbed) SAM, and at init what the plain SAM gives."""
    plain = load_sam(tiny_checkpoint)
    model = make_model(tiny_checkpoint, num_classes=3, input_size=256).eval()
    x = images(2, 256)
    points = torch.tensor([[[60.0, 80.0], [200.0, 30.0]], [[10.0, 10.0], [128.0, 128.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    boxes = torch.tensor([[20.0, 30.0, 120.0, 140.0], [100.0, 90.0, 250.0, 200.0]])
    batch = [{"image": x[i], "original_size": (256, 256), "point_coords": points, "point_labels": labels,
              "boxes": boxes} for i in range(2)]

    def ours(multimask: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            embeddings = model.encode(x).embedding
            return [model.prompt_head(embeddings[i : i + 1], Prompts(points, labels, boxes), multimask) for i in range(2)]

    for multimask in (False, True):
        expected = plain(batch, multimask_output=multimask)
        for (masks, iou), reference in zip(ours(multimask), expected):
            assert masks.shape == (2, 3 if multimask else 1, 64, 64)
            torch.testing.assert_close(masks, reference["low_res_logits"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(iou, reference["iou_predictions"], rtol=1e-5, atol=1e-5)
    perturb_trainable(model, scale=0.05)
    expected = model.sam(batch, multimask_output=True)
    for (masks, iou), reference in zip(ours(True), expected):
        assert torch.equal(masks, reference["low_res_logits"]) and torch.equal(iou, reference["iou_predictions"])
    with pytest.raises(ValueError, match="one image"):
        model.prompt_head(model.encode(x).embedding, Prompts(boxes=boxes))


def test_early_feature_is_the_first_global_blocks_output(tiny_checkpoint):
    base = load_base(tiny_checkpoint)
    model = make_model(base, input_size=128).eval()
    x = images(2, 128)
    assert model.encode(x).early is None
    model.capture_early_feature(True)
    with torch.no_grad():
        features = model.encode(x)
        encoder = model.sam.image_encoder
        h = encoder.patch_embed((x - model.pixel_mean) / model.pixel_std) + encoder.pos_embed
        for block in encoder.blocks[: base.architecture.first_global_block + 1]:
            h = block(h)
    assert features.early.shape == (2, 8, 8, 64) and torch.equal(features.early, h)
    model.capture_early_feature(False)
    assert model.encode(x).early is None


def test_adapters_wrap_every_qkv_by_default(tiny_checkpoint):
    model = make_model(tiny_checkpoint)
    names = [n for n, _ in adapter_layers(model.sam.image_encoder)]
    assert names == [f"blocks.{i}.attn.qkv" for i in range(2)]
    assert all(isinstance(m, ConvLoRALinear) for _, m in adapter_layers(model))
    lora = make_model(tiny_checkpoint, method="lora", targets=("attn.proj", "mlp.lin1"))
    assert sorted(n for n, _ in adapter_layers(lora.sam.image_encoder)) == sorted(
        [f"blocks.{i}.attn.proj" for i in range(2)] + [f"blocks.{i}.mlp.lin1" for i in range(2)]
    )
    with pytest.raises(ValueError, match="no Linear layer matches"):
        make_model(tiny_checkpoint, targets=("attn.nothing",))


def test_parameter_counts_on_vit_b_geometry():
    counts = {}
    for method in ("conv_lora", "lora"):
        model = make_model(random_base("vit_b"), method=method, input_size=256)
        trained = model.trainable_state_dict()
        counts[method] = sum(v.numel() for k, v in trained.items() if k.startswith("sam.image_encoder."))
        decoder = sum(v.numel() for k, v in trained.items() if not k.startswith("sam.image_encoder."))
        assert decoder == 3_505_536  # METHODS.md 1.5: binary decoder without the IoU head
        assert sum(p.numel() for p in model.trainable_parameters()) == counts[method] + decoder
        assert {p for p in model.parameters() if p.requires_grad} == set(model.trainable_parameters())
    assert counts == {"conv_lora": 119_232, "lora": 110_592}


@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_and_head_change_after_a_step(tiny_checkpoint, method):
    model = perturb_trainable(make_model(tiny_checkpoint, num_classes=4, method=method, input_size=128).train())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=1e-4)
    out = model(images(2, 128))
    loss = out.mask_logits.square().mean() + out.class_logits.square().mean() + out.balance_loss
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    allowed = set(model.trainable_state_dict())
    assert changed and changed <= allowed
    assert not any("iou_prediction_head" in k or "prompt_encoder" in k for k in allowed)
    assert not any(k.startswith("sam.mask_decoder.mask_tokens") or "hypernetworks_mlps.1" in k for k in allowed)
    assert not any(k.startswith("sam.image_encoder.") and ".base_layer." in k for k in allowed)
    assert {"head.mask_tokens.weight", "head.class_head.weight", "sam.mask_decoder.iou_token.weight"} <= allowed
    if method == "decoder":
        assert not any(k.startswith("sam.image_encoder.") for k in allowed)
    else:
        assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)


def test_heads_shapes_and_probabilities(tiny_checkpoint):
    binary = make_model(tiny_checkpoint, num_classes=2, input_size=128).eval()
    x = images(3, 128)
    out = binary(x)
    assert isinstance(out, SegmentationOutput)
    assert out.mask_logits.shape == (3, 1, 32, 32) and out.class_logits is None
    p = binary.class_probabilities(x)
    assert p.shape == (3, 2, 128, 128)
    torch.testing.assert_close(p.sum(1), torch.ones(3, 128, 128))
    multi = perturb_trainable(make_model(tiny_checkpoint, num_classes=5, input_size=128, num_mask_tokens=7).eval())
    out = multi(x)
    assert out.mask_logits.shape == (3, 7, 32, 32) and out.class_logits.shape == (3, 7, 6)
    p = multi.class_probabilities(x)
    torch.testing.assert_close(p.sum(1), torch.ones(3, 128, 128))
    seg = multi.segment(x)
    assert seg.dtype == torch.int64 and seg.shape == (3, 128, 128) and int(seg.max()) < 5
    # The semantic map is the class-weighted sum of mask probabilities (METHODS.md 1.6).
    masks = torch.nn.functional.interpolate(out.mask_logits, size=(128, 128), mode="bilinear", align_corners=False)
    semantic = torch.einsum("bqk,bqhw->bkhw", out.class_logits.softmax(-1)[..., :-1], masks.sigmoid())
    torch.testing.assert_close(semantic / semantic.sum(1, keepdim=True), p)


def test_probabilities_sum_to_one_where_every_mask_logit_is_very_negative(tiny_checkpoint):
    """Where all tokens' sigmoids underflowed, the normalisation divided by a clamped 1e-12 and the
    probabilities summed to 0.03 (found when a perturbed model's tiles blended to the wrong sums)."""
    model = make_model(tiny_checkpoint, num_classes=3, input_size=64)
    masks = torch.full((1, 6, 16, 16), -60.0)
    masks[0, 1] = -35.0
    class_logits = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    p = model.probabilities_from_output(SegmentationOutput(masks, class_logits, torch.zeros(())))
    torch.testing.assert_close(p.sum(1), torch.ones(1, 64, 64))
    torch.testing.assert_close(p[0, :, 0, 0], class_logits.softmax(-1)[0, 1, :3] / class_logits.softmax(-1)[0, 1, :3].sum(),
                               rtol=1e-3, atol=1e-4)  # the least negative token dominates


def test_mask_tokens_start_as_sam_token_zero_and_share_mlp_zero(tiny_checkpoint):
    base = load_base(tiny_checkpoint)
    token0 = base.sam.mask_decoder.mask_tokens.weight[0].clone()
    model = make_model(base, num_classes=4, num_mask_tokens=6)
    assert torch.equal(model.head.mask_tokens.weight, token0.expand(6, -1))
    assert model.head.decoder is base.sam.mask_decoder
    assert model.head.decoder.output_hypernetworks_mlps[0] is base.sam.mask_decoder.output_hypernetworks_mlps[0]
    assert model.head.class_head.out_features == 5
    assert "head.decoder.transformer.layers.0.self_attn.q_proj.weight" not in model.state_dict()  # saved once


def test_wrong_input_shape_is_explained(tiny_checkpoint):
    model = make_model(tiny_checkpoint, input_size=128)
    with pytest.raises(ValueError, match="expected images B x 3 x 128 x 128"):
        model(images(1, 256))
    with pytest.raises(ValueError, match="multiple of 16"):
        make_model(tiny_checkpoint, input_size=100)


def test_disable_remove_and_merge(tiny_checkpoint):
    x = images(1, 128)
    with torch.no_grad():  # predictions (the attention computes alike with and without adapters there)
        for method in ("lora", "conv_lora"):
            model = make_model(tiny_checkpoint, method=method, input_size=128).eval()
            plain = model.encode(x).embedding.detach()
            perturb_trainable(model)
            adapted = model.encode(x).embedding.detach()
            assert not torch.allclose(adapted, plain)
            model.set_adapters_enabled(False)
            assert torch.equal(model.encode(x).embedding, plain)
            model.set_adapters_enabled(True)
            if method == "lora":
                assert remove_adapters(model.sam, merge=True) == 2
                assert not adapter_layers(model.sam)
                torch.testing.assert_close(model.encode(x).embedding, adapted, atol=1e-4, rtol=1e-4)
            else:
                with pytest.raises(NotImplementedError, match="cannot be merged"):
                    remove_adapters(model.sam, merge=True)
                assert len(adapter_layers(model.sam)) == 2  # nothing changed by the refused merge
                assert remove_adapters(model.sam) == 2
                assert torch.equal(model.encode(x).embedding, plain)


def test_balance_loss_is_summed_over_blocks(tiny_checkpoint):
    model = perturb_trainable(make_model(tiny_checkpoint, input_size=128).train())
    out = model(images(2, 128))
    per_layer = [layer.balance_loss for _, layer in adapter_layers(model)]
    assert len(per_layer) == 2 and all(v is not None for v in per_layer)
    torch.testing.assert_close(out.balance_loss, per_layer[0] + per_layer[1])
    lora = make_model(tiny_checkpoint, method="lora", input_size=128)
    assert float(lora(images(1, 128)).balance_loss) == 0.0


def test_activation_checkpointing_keeps_names_and_gradients(tiny_checkpoint):
    grads, keys = [], []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = make_model(tiny_checkpoint, num_classes=3, input_size=64).train()
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(0.05)
        model.set_activation_checkpointing(enabled)
        keys.append((list(model.state_dict()), sorted(model.trainable_state_dict())))
        torch.manual_seed(1)
        out = model(images(2, 64, seed=2))
        (out.mask_logits.square().mean() + out.balance_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if enabled:
            state = model.state_dict()
            model.load_state_dict(state)  # the wrapper's names load back
    assert sorted(keys[0][0]) == sorted(keys[1][0]) and keys[0][1] == keys[1][1]
    assert len(grads[0]) == len(grads[1])
    for (name_a, grad_a), grad_b in zip(grads[0].items(), grads[1].values()):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6, msg=name_a)


def test_inject_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown adapter method"):
        AdapterConfig(method="prefix")
    with pytest.raises(ValueError, match="scales"):
        AdapterConfig(num_experts=4, scales=(1, 2))
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert inject_adapters(layer, AdapterConfig(method="lora", targets=("0",))) == ["0"]
    assert isinstance(layer[0], LoRALinear)


def test_gate_routes_in_fp32_under_mixed_precision():
    """Under autocast the gate's matmul ran in bf16 while its softmax ran in fp32, and prediction on CUDA
    failed in ``scatter`` (found on an H200); routing now happens in fp32 whatever the autocast state."""
    from napari_convlora.adapters.gate import NoisyTopKGate

    gate = NoisyTopKGate(3, 8).eval()
    with torch.no_grad():
        gate.w_gate.normal_(generator=torch.Generator().manual_seed(0))
    z = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    expected, expected_loss = gate(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, loss = gate(z)
    assert gates.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.equal(gates, expected) and torch.equal(loss, expected_loss)


def test_a_sam_serves_one_model_and_must_match_the_config(tiny_checkpoint):
    from napari_convlora import AdaptedSAM
    from napari_convlora.config import ModelConfig, PRESETS

    for method in ("conv_lora", "decoder"):  # decoder-only models carry no adapters but share SAM's decoder too
        base = load_base(tiny_checkpoint)
        make_model(base, method=method)
        with pytest.raises(ValueError, match="already part of another model"):
            make_model(base)
    base = load_base(tiny_checkpoint)
    before = base.sam.image_encoder.pos_embed
    with pytest.raises(ValueError, match="no Linear layer matches"):
        make_model(base, input_size=128, targets=("attn.nothing",))
    assert base.sam.image_encoder.pos_embed is before  # a refused model leaves its SAM as it was
    make_model(base, input_size=128)
    with pytest.raises(ValueError, match=r"geometry of the config \(differs in \['image_size', 'encoder_embed_dim'"):
        AdaptedSAM(load_sam(tiny_checkpoint), ModelConfig(base=PRESETS["vit_b"], input_size=256))


def test_experts_run_in_fp32_under_mixed_precision():
    """Bicubic resizing's backward in bf16 made each expert 3-8 x slower on an H200 than in fp32
    (``benchmarks/bench_expert_variants.py``); the experts now run in their weights' dtype, whatever the
    autocast state, and their sum joins the bottleneck in its own dtype."""
    from napari_convlora.adapters.layers import ConvLoRALinear

    layer = ConvLoRALinear(torch.nn.Linear(8, 8), rank=3).train()
    seen = []
    for expert in layer.experts:
        expert.conv.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x = torch.randn(4, 6, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert seen and all(pair == (torch.float32, torch.float32) for pair in seen)
    assert y.dtype == torch.bfloat16  # the layer's output keeps autocast's dtype
    assert any(e.conv.weight.grad is not None for e in layer.experts)
