"""Format-version-1 files (napari-convlora 0.1.0) still load and give the same probabilities.

The fixture in ``tests/fixtures/format_v1`` was written by that version's own code (see its
``make_fixture.py``): a small SAM checkpoint, a Conv-LoRA adapter trained on it, the same model as a one-file
"merged" model, and the class probabilities that version's model gave for two fixed images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_convlora import describe, load_model, save_adapter
from napari_convlora.config import InputSpec
from napari_convlora.checkpoints.model_files import read_record
from napari_convlora.modeling import Prompts

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"


@pytest.fixture(scope="module")
def expected():
    record = np.load(FIXTURE / "expected.npz")
    return torch.from_numpy(record["images"]), torch.from_numpy(record["probabilities"])


@pytest.mark.parametrize("name, base", [("adapter.safetensors", "base.pth"), ("merged.safetensors", None)])
def test_version_1_files_load_and_predict_as_before(name, base, expected):
    images, probabilities = expected
    model = load_model(FIXTURE / name, base=FIXTURE / base if base else None)
    with torch.no_grad():
        got = model.class_probabilities(images)
    # the probabilities are now mixed in a way that cannot underflow: equal up to float rounding
    torch.testing.assert_close(got, probabilities, rtol=0, atol=1e-6)
    assert torch.equal(got.argmax(1), probabilities.argmax(1))
    head = model.config.head
    assert head.class_names == ("background", "cell", "debris") and head.class_values == (1, 2, 5)
    assert head.label_mode == "sparse" and head.background_value == 1 and head.num_mask_tokens == 4
    assert model.config.input == InputSpec(percentiles=(2.0, 98.0), rescale=0.5)
    assert model.config.adapter.method == "conv_lora" and model.config.input_size == 64


def test_version_1_records_read_in_the_current_shape():
    adapter, bundle = read_record(FIXTURE / "adapter.safetensors"), read_record(FIXTURE / "merged.safetensors")
    assert adapter["format_version"] == 1 and adapter["format"] == "napari-convlora-adapter"
    assert bundle["format"] == "napari-convlora-bundle"
    assert adapter["config"]["base_checkpoint"]["file_name"] == "base.pth"
    assert describe(FIXTURE / "adapter.safetensors")["config"]["input"]["rescale"] == 0.5


def test_a_version_1_adapter_saved_again_is_version_2(tmp_path, expected):
    model = load_model(FIXTURE / "adapter.safetensors", base=FIXTURE / "base.pth")
    path = save_adapter(model, tmp_path / "again.safetensors")
    assert read_record(path)["format_version"] == 2
    again = load_model(path, base=FIXTURE / "base.pth")
    with torch.no_grad():
        assert torch.equal(again.class_probabilities(expected[0]), model.class_probabilities(expected[0]))


def test_sams_own_decoding_is_refused_on_a_version_1_bundle():
    """Version-1 bundles replaced SAM's own mask tokens by the head's: SAM's promptable path cannot be rebuilt."""
    bundle = load_model(FIXTURE / "merged.safetensors")
    embedding = bundle.encode(torch.zeros(1, 3, 64, 64)).embedding
    with pytest.raises(RuntimeError, match="version-1 one-file model"):
        bundle.prompt_head(embedding, Prompts(boxes=torch.tensor([[0.0, 0.0, 30.0, 30.0]])))
    adapter = load_model(FIXTURE / "adapter.safetensors", base=FIXTURE / "base.pth")
    masks, iou = adapter.prompt_head(adapter.encode(torch.zeros(1, 3, 64, 64)).embedding,
                                     Prompts(boxes=torch.tensor([[0.0, 0.0, 30.0, 30.0]])))
    assert masks.shape == (1, 1, 16, 16) and iou.shape == (1, 1)
