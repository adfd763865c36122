"""LoRA on the q and v slices of SAM's fused qkv (WeSAM's adapter, METHODS.md 3.1): counts, equality with a
SAMed-style re-statement, switches, merging, checkpointing, files and the config's checks."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from helpers import images, make_model, perturb_trainable
from segment_anything.modeling.image_encoder import Block

from napari_convlora import (
    AdaptedSAM,
    load_base,
    load_model,
    load_sam,
    random_base,
    save_adapter,
)
from napari_convlora.adapters.inject import (
    adapter_layers,
    inject_adapters,
    remove_adapters,
)
from napari_convlora.adapters.layers import LoRALinear
from napari_convlora.adapters.qkv_lora import QkvSliceLoRALinear
from napari_convlora.config import (
    AdapterConfig,
    HeadConfig,
    ModelConfig,
    SamArchitecture,
    from_record,
    to_record,
    wesam_adapter,
)
from napari_convlora.errors import ConfigError
from napari_convlora.modeling import resize_sam_input
from napari_convlora.checkpoints.sam_files import BaseSam

WESAM_COUNTS = {"vit_b": 147_456, "vit_l": 393_216, "vit_h": 655_360}  # METHODS.md 3.8.5


def _wesam_model(base, input_size: int = 128, adapter: AdapterConfig | None = None) -> AdaptedSAM:
    base = base if isinstance(base, BaseSam) else load_base(base)
    config = ModelConfig(base=base.architecture, adapter=adapter or wesam_adapter(), head=HeadConfig(),
                         input_size=input_size, base_checkpoint=base.checkpoint)
    return AdaptedSAM.from_base(base, config)


def _encoder_adapter_count(model: AdaptedSAM) -> int:
    return sum(v.numel() for k, v in model.trainable_state_dict().items() if k.startswith("sam.image_encoder."))


class SamedQkv(torch.nn.Module):
    """SAMed's qkv wrapper, re-stated: q += B_q A_q x and v += B_v A_v x on the fused output, k unchanged."""

    def __init__(self, qkv: torch.nn.Linear, rank: int):
        super().__init__()
        d = qkv.in_features
        self.qkv, self.dim = qkv, d
        self.a_q, self.b_q = torch.nn.Linear(d, rank, bias=False), torch.nn.Linear(rank, d, bias=False)
        self.a_v, self.b_v = torch.nn.Linear(d, rank, bias=False), torch.nn.Linear(rank, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x).clone()
        out[..., : self.dim] += self.b_q(self.a_q(x))
        out[..., 2 * self.dim:] += self.b_v(self.a_v(x))
        return out

    def copy_from(self, layer: QkvSliceLoRALinear) -> None:
        with torch.no_grad():
            for s in ("q", "v"):
                getattr(self, f"a_{s}").weight.copy_(layer.lora_A[s].weight)
                getattr(self, f"b_{s}").weight.copy_(layer.lora_B[s].weight)


# ---- parameter counts -------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_parameter_counts_per_geometry_from_one_block(model_type):
    arch = SamArchitecture.preset(model_type)
    torch.manual_seed(0)
    block = Block(dim=arch.encoder_embed_dim, num_heads=arch.encoder_num_heads, qkv_bias=True, window_size=14,
                  input_size=(14, 14), use_rel_pos=True)
    assert inject_adapters(block, wesam_adapter()) == ["attn.qkv"]
    (_, layer), = adapter_layers(block)
    per_block = sum(p.numel() for name, p in layer.named_parameters() if not name.startswith("base_layer."))
    d, r = arch.encoder_embed_dim, 4
    assert per_block == 4 * d * r
    assert per_block * arch.encoder_depth == WESAM_COUNTS[model_type]


def test_parameter_count_on_a_whole_vit_b():
    model = _wesam_model(random_base("vit_b"), input_size=256)
    assert _encoder_adapter_count(model) == WESAM_COUNTS["vit_b"]
    assert len(model.adapted_layers) == 12 and all(isinstance(m, QkvSliceLoRALinear) for _, m in adapter_layers(model))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["vit_l", "vit_h"])
def test_parameter_count_on_whole_large_geometries(model_type):
    assert _encoder_adapter_count(_wesam_model(random_base(model_type), input_size=256)) == WESAM_COUNTS[model_type]


# ---- what the layer computes ------------------------------------------------------------------------

def test_layer_equals_a_samed_style_restatement_and_leaves_k_alone():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48)
    layer = QkvSliceLoRALinear(base, rank=4, alpha=4.0)
    assert torch.equal(layer.lora_B["q"].weight, torch.zeros(16, 4)) and torch.equal(layer.lora_B["v"].weight,
                                                                                         torch.zeros(16, 4))
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt 5) on a 16-input Linear
    assert layer.lora_A["q"].weight.abs().max() <= bound and layer.lora_A["q"].weight.std() > bound / 4
    perturb_trainable(layer, scale=0.3)
    reference = SamedQkv(base, 4)
    reference.copy_from(layer)
    x = torch.randn(2, 5, 5, 16)
    with torch.no_grad():
        got, expected, plain = layer(x), reference(x), base(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got[..., 16:32], plain[..., 16:32])  # k untouched
    assert not torch.allclose(got[..., :16], plain[..., :16]) and not torch.allclose(got[..., 32:], plain[..., 32:])


def test_adapted_encoder_equals_samed_style_adaptation_of_plain_sam(tiny_checkpoint):
    model = perturb_trainable(_wesam_model(tiny_checkpoint).eval())
    plain = load_sam(tiny_checkpoint)
    resize_sam_input(plain, 128)
    for block, (_, layer) in zip(plain.image_encoder.blocks, adapter_layers(model.sam.image_encoder)):
        block.attn.qkv = SamedQkv(block.attn.qkv, 4)
        block.attn.qkv.copy_from(layer)
    x = images(2, 128)
    with torch.no_grad():
        expected = plain.image_encoder((x - plain.pixel_mean) / plain.pixel_std)
        got = model.encode(x).embedding
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_identity_at_init_adapters_off_merge_and_remove(tiny_checkpoint):
    x = images(1, 128)
    model = _wesam_model(tiny_checkpoint).eval()
    with torch.no_grad():
        plain = model.encode(x).embedding
        perturb_trainable(model)
        adapted = model.encode(x).embedding
        assert not torch.allclose(adapted, plain)
        model.set_adapters_enabled(False)
        assert torch.equal(model.encode(x).embedding, plain)
        model.set_adapters_enabled(True)
        (_, layer), *_ = adapter_layers(model.sam)
        merged = layer.merged()
        probe = torch.randn(3, 64)
        torch.testing.assert_close(merged(probe), layer(probe), rtol=1e-5, atol=1e-5)
        assert remove_adapters(model.sam, merge=True) == 2 and not adapter_layers(model.sam)
        torch.testing.assert_close(model.encode(x).embedding, adapted, atol=1e-4, rtol=1e-4)
    other = perturb_trainable(_wesam_model(load_base(tiny_checkpoint)).eval())
    assert remove_adapters(other.sam) == 2
    with torch.no_grad():
        assert torch.equal(other.encode(x).embedding, plain)


def test_activation_checkpointing_keeps_names_and_gradients(tiny_checkpoint):
    grads, keys = [], []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = perturb_trainable(_wesam_model(tiny_checkpoint, input_size=64).train(), scale=0.05)
        model.set_activation_checkpointing(enabled)
        keys.append((sorted(model.state_dict()), sorted(model.trainable_state_dict())))
        model(images(2, 64, seed=2)).mask_logits.square().mean().backward()
        grads.append({re.sub(r"(blocks\.\d+)\.block\.", r"\1.", n): p.grad.clone()  # the wrapper's own level
                      for n, p in model.named_parameters() if p.grad is not None})
    assert keys[0] == keys[1]
    assert any(".lora_A.q." in n for n in grads[0]) and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---- names and files --------------------------------------------------------------------------------

def test_state_dict_names_and_plain_lora_unchanged(tiny_checkpoint):
    sliced = _wesam_model(tiny_checkpoint)
    encoder_keys = sorted(k for k in sliced.trainable_state_dict() if k.startswith("sam.image_encoder."))
    assert encoder_keys == sorted(f"sam.image_encoder.blocks.{i}.attn.qkv.lora_{m}.{s}.weight"
                                  for i in range(2) for m in "AB" for s in "qv")
    plain = make_model(tiny_checkpoint, method="lora")
    assert all(type(m) is LoRALinear for _, m in adapter_layers(plain))
    assert sorted(k for k in plain.trainable_state_dict() if k.startswith("sam.image_encoder.")) == sorted(
        f"sam.image_encoder.blocks.{i}.attn.qkv.lora_{m}.weight" for i in range(2) for m in "AB")


def test_adapter_file_round_trip(tmp_path, tiny_checkpoint):
    model = perturb_trainable(_wesam_model(tiny_checkpoint), scale=0.1).eval()
    x = images(2, 128, seed=3)
    with torch.no_grad():
        expected = model.class_probabilities(x)
    path = save_adapter(model, tmp_path / "wesam.safetensors")
    loaded = load_model(path, base=tiny_checkpoint)
    assert loaded.config == model.config and loaded.config.adapter.qkv_slices == ("q", "v")
    assert all(isinstance(m, QkvSliceLoRALinear) for _, m in adapter_layers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded.class_probabilities(x), expected)


def test_records_round_trip_and_older_records_mean_no_slices():
    record = to_record(wesam_adapter())
    assert record["qkv_slices"] == ["q", "v"]
    assert from_record(AdapterConfig, record, "test") == wesam_adapter()
    del record["qkv_slices"]  # a record written before the field existed
    assert from_record(AdapterConfig, record, "test").qkv_slices is None


# ---- checks -----------------------------------------------------------------------------------------

def test_wesam_adapter_is_the_reference_setting():
    config = wesam_adapter()
    assert (config.method, config.rank, config.alpha / config.rank, config.dropout) == ("lora", 4, 1.0, 0.0)
    assert config.targets == ("attn.qkv",) and config.qkv_slices == ("q", "v")
    assert wesam_adapter() is not config  # a fresh object each time
    assert AdapterConfig(method="lora", qkv_slices=["v", "q"]).qkv_slices == ("q", "v")


@pytest.mark.parametrize("options, message", [
    ({"method": "conv_lora", "qkv_slices": ("q", "v")}, "needs method 'lora'"),
    ({"method": "lora", "qkv_slices": ("q", "x")}, "distinct names among"),
    ({"method": "lora", "qkv_slices": ("q", "q")}, "distinct names among"),
    ({"method": "lora", "qkv_slices": ()}, "distinct names among"),
    ({"method": "lora", "qkv_slices": ("q",), "targets": ("attn.qkv", "mlp.lin1")}, "fused qkv layers only"),
])
def test_config_rejects_what_cannot_be_sliced(options, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(**options)


def test_a_qkv_named_linear_that_is_not_fused_is_refused_before_anything_changes():
    root = torch.nn.ModuleDict({"a": torch.nn.ModuleDict({"qkv": torch.nn.Linear(8, 24)}),
                                "b": torch.nn.ModuleDict({"qkv": torch.nn.Linear(8, 16)})})
    config = dataclasses.replace(wesam_adapter(), targets=("qkv",))
    with pytest.raises(ConfigError, match=r"'b.qkv' maps 8 -> 16"):
        inject_adapters(root, config)
    assert not adapter_layers(root)
    with pytest.raises(ValueError, match="fused qkv"):
        QkvSliceLoRALinear(torch.nn.Linear(8, 16), rank=2, alpha=2.0)
