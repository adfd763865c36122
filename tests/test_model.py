"""ConvLoRASAM: identity at init, trainable set, parameter counts, heads, adapter switches."""

from __future__ import annotations

import pytest
import torch

from napari_convlora import ConvLoRASAM, load_sam, random_sam
from napari_convlora.adapters.inject import adapter_layers, inject_adapters, remove_adapters
from napari_convlora.adapters.layers import ConvLoRALinear, LoRALinear
from napari_convlora.config import AdapterConfig

METHODS = ["conv_lora", "lora", "decoder"]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def _perturb_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [256, 128])
def test_encoder_equals_plain_sam_right_after_adapters(tiny_checkpoint, method, size):
    plain = load_sam(tiny_checkpoint)
    model = ConvLoRASAM(load_sam(tiny_checkpoint), num_classes=3, adapter=method, input_size=size).eval()
    if size != 256:
        ConvLoRASAM(plain, num_classes=3, adapter="decoder", input_size=size)  # same resizing, no adapter
    x = _images(2, size)
    with torch.no_grad():
        expected = plain.image_encoder((x - plain.pixel_mean) / plain.pixel_std)
        got = model.encode(x)
    assert torch.equal(got, expected)


def test_adapters_wrap_every_qkv_by_default(tiny_checkpoint):
    model = ConvLoRASAM(load_sam(tiny_checkpoint))
    names = [n for n, _ in adapter_layers(model.sam.image_encoder)]
    assert names == [f"blocks.{i}.attn.qkv" for i in range(2)]
    assert all(isinstance(m, ConvLoRALinear) for _, m in adapter_layers(model))
    lora = ConvLoRASAM(load_sam(tiny_checkpoint), adapter="lora", targets=("attn.proj", "mlp.lin1"))
    assert sorted(n for n, _ in adapter_layers(lora.sam.image_encoder)) == sorted(
        [f"blocks.{i}.attn.proj" for i in range(2)] + [f"blocks.{i}.mlp.lin1" for i in range(2)]
    )
    with pytest.raises(ValueError, match="no Linear layer matches"):
        ConvLoRASAM(load_sam(tiny_checkpoint), targets=("attn.nothing",))


def test_parameter_counts_on_vit_b_geometry():
    counts = {}
    for method in ("conv_lora", "lora"):
        model = ConvLoRASAM(random_sam("vit_b"), adapter=method, input_size=256)
        trained = model.trainable_state_dict()
        counts[method] = sum(v.numel() for k, v in trained.items() if k.startswith("sam.image_encoder."))
        decoder = sum(v.numel() for k, v in trained.items() if k.startswith("sam.mask_decoder."))
        assert decoder == 3_505_536  # METHODS.md 1.5: binary decoder without the IoU head
    assert counts == {"conv_lora": 119_232, "lora": 110_592}


@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_and_head_change_after_a_step(tiny_checkpoint, method):
    model = ConvLoRASAM(load_sam(tiny_checkpoint), num_classes=4, adapter=method, input_size=128).train()
    _perturb_trainable(model)  # B != 0 so that A receives gradient too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-4)
    out = model(_images(2, 128))
    loss = out.mask_logits.square().mean() + out.class_logits.square().mean() + out.balance_loss
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    allowed = set(model.trainable_state_dict())
    assert changed and changed <= allowed
    assert not any("iou_prediction_head" in k or "prompt_encoder" in k for k in allowed)
    assert not any(k.startswith("sam.image_encoder.") and ".base_layer." in k for k in allowed)
    if method == "decoder":
        assert not any(k.startswith("sam.image_encoder.") for k in allowed)
    else:
        assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)


def test_heads_shapes_and_probabilities(tiny_checkpoint):
    binary = ConvLoRASAM(load_sam(tiny_checkpoint), num_classes=2, input_size=128).eval()
    x = _images(3, 128)
    out = binary(x)
    assert out.mask_logits.shape == (3, 1, 32, 32) and out.class_logits is None
    p = binary.class_probabilities(x)
    assert p.shape == (3, 2, 128, 128)
    torch.testing.assert_close(p.sum(1), torch.ones(3, 128, 128))
    multi = ConvLoRASAM(load_sam(tiny_checkpoint), num_classes=5, input_size=128, num_mask_tokens=7).eval()
    _perturb_trainable(multi)
    out = multi(x)
    assert out.mask_logits.shape == (3, 7, 32, 32) and out.class_logits.shape == (3, 7, 6)
    p = multi.class_probabilities(x)
    torch.testing.assert_close(p.sum(1), torch.ones(3, 128, 128))
    seg = multi.segment(x)
    assert seg.dtype == torch.int64 and seg.shape == (3, 128, 128) and int(seg.max()) < 5
    # The semantic map is the class-weighted sum of mask probabilities (METHODS.md 1.6).
    masks = torch.nn.functional.interpolate(out.mask_logits, size=(128, 128), mode="bilinear", align_corners=False)
    semantic = torch.einsum("bqk,bqhw->bkhw", out.class_logits.softmax(-1)[..., :-1], masks.sigmoid())
    assert torch.equal(semantic.argmax(1), seg)


def test_mask_tokens_start_as_sam_token_zero(tiny_checkpoint):
    sam = load_sam(tiny_checkpoint)
    token0 = sam.mask_decoder.mask_tokens.weight[0].clone()
    mlp0 = sam.mask_decoder.output_hypernetworks_mlps[0]
    model = ConvLoRASAM(sam, num_classes=4, num_mask_tokens=6)
    assert torch.equal(model.sam.mask_decoder.mask_tokens.weight, token0.expand(6, -1))
    assert len(model.sam.mask_decoder.output_hypernetworks_mlps) == 1
    assert model.sam.mask_decoder.output_hypernetworks_mlps[0] is mlp0
    assert model.class_head.out_features == 5


def test_wrong_input_shape_is_explained(tiny_checkpoint):
    model = ConvLoRASAM(load_sam(tiny_checkpoint), input_size=128)
    with pytest.raises(ValueError, match="expected images B x 3 x 128 x 128"):
        model(_images(1, 256))
    with pytest.raises(ValueError, match="multiple of 16"):
        ConvLoRASAM(load_sam(tiny_checkpoint), input_size=100)


def test_disable_remove_and_merge(tiny_checkpoint):
    x = _images(1, 128)
    for method in ("lora", "conv_lora"):
        model = ConvLoRASAM(load_sam(tiny_checkpoint), adapter=method, input_size=128).eval()
        plain = model.encode(x).detach()
        _perturb_trainable(model)
        adapted = model.encode(x).detach()
        assert not torch.allclose(adapted, plain)
        model.set_adapters_enabled(False)
        assert torch.equal(model.encode(x), plain)
        model.set_adapters_enabled(True)
        if method == "lora":
            assert remove_adapters(model.sam, merge=True) == 2
            assert not adapter_layers(model.sam)
            torch.testing.assert_close(model.encode(x), adapted, atol=1e-4, rtol=1e-4)
        else:
            with pytest.raises(NotImplementedError, match="cannot be merged"):
                remove_adapters(model.sam, merge=True)
            assert len(adapter_layers(model.sam)) == 2  # nothing changed by the refused merge
            assert remove_adapters(model.sam) == 2
            assert torch.equal(model.encode(x), plain)


def test_balance_loss_is_summed_over_blocks(tiny_checkpoint):
    model = ConvLoRASAM(load_sam(tiny_checkpoint), input_size=128).train()
    _perturb_trainable(model)
    out = model(_images(2, 128))
    per_layer = [layer.balance_loss for _, layer in adapter_layers(model)]
    assert len(per_layer) == 2 and all(v is not None for v in per_layer)
    torch.testing.assert_close(out.balance_loss, per_layer[0] + per_layer[1])
    lora = ConvLoRASAM(load_sam(tiny_checkpoint), adapter="lora", input_size=128)
    assert float(lora(_images(1, 128)).balance_loss) == 0.0


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
