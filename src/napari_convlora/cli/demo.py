"""``napari-convlora demo``: the whole job on built-in data, in a minute on a CPU.

By default it starts from the **built-in small SAM** (``builtin_model``: about 3.8 M parameters, pretrained in
this repository on generated scenes; nothing is downloaded). Its numbers show the pipeline and what a small
model reaches, not what a real SAM achieves: pass ``--checkpoint sam_vit_b_01ec64.pth`` for that.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ..checkpoints.builtin import builtin_checkpoint, describe_builtin
from ..checkpoints.model_files import load_model
from ..checkpoints.sam_files import load_base
from ..config import AdapterConfig, RunOptions, TrainRecipe
from ..data import TrainingPair, prepare_training_data
from ..data.samples import CLASS_NAMES, synthetic_cells
from ..io.images import overlay_png, write_image
from ..prediction.planes import evaluate_image, predict_image
from ..training.loop import train
from .progress import TerminalProgress


def run_demo(
    out_dir: Path,
    checkpoint: str | Path | None = None,
    steps: int | None = None,
    run: RunOptions | None = None,
    input_size: int | None = None,
    size: int = 384,
) -> dict:
    """Train on one synthetic image, evaluate on another, write files; returns the metrics dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = run or RunOptions()
    if checkpoint is None:
        checkpoint = builtin_checkpoint()
        print(f"Base model: {describe_builtin()} (napari-convlora demo --checkpoint sam_vit_b_01ec64.pth).")
        input_size = input_size or 256
        steps = steps or 300
    else:
        arch = load_base(checkpoint).architecture
        print(f"Base model: {checkpoint} ({arch.model_type or 'custom SAM'})")
        input_size = input_size or 512
        steps = steps or 100
    train_image, train_labels = synthetic_cells(size, seed=0)
    test_image, test_labels = synthetic_cells(size, seed=1)
    write_image(out_dir / "train_image.tif", train_image)
    write_image(out_dir / "train_labels.tif", train_labels)
    write_image(out_dir / "test_image.tif", test_image)
    print(f"Data: synthetic 16-bit {size}x{size} images, classes {', '.join(CLASS_NAMES)} "
          "(nuclei are round and smooth, rods elongated, striped and dimmer).")

    recipe = TrainRecipe(adapter=AdapterConfig(method="conv_lora"), input_size=input_size, label_mode="dense",
                         class_names=CLASS_NAMES, val_fraction=0.15, steps=steps, grad_accum=2, batch_size=2, lr=1e-3)
    data = prepare_training_data([TrainingPair(train_image, train_labels)], recipe)
    model_path = out_dir / "model.safetensors"
    progress = TerminalProgress(class_names=CLASS_NAMES)
    for event in train(checkpoint, data, model_path, recipe, run, stop=threading.Event()):
        progress.show(event)
    progress.close()

    model = load_model(model_path, base=checkpoint)
    prediction = predict_image(model, test_image, device=run.device)
    metrics = evaluate_image(model, test_image, test_labels, device=run.device, prediction=prediction)
    write_image(out_dir / "test_prediction.tif", prediction.labels)
    overlay_png(out_dir / "test_overlay.png", test_image, prediction.labels)
    (out_dir / "test_metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2))
    print("\nHeld-out test image (never seen in training):")
    print(metrics.format(CLASS_NAMES))
    print(f"\nFiles in {out_dir}:\n  model.safetensors (adapter), model.best.safetensors, model.training.pt (resume)\n"
          "  test_prediction.tif (labels), test_overlay.png (prediction over the image), test_metrics.json")
    return metrics.to_dict()


__all__ = ["run_demo"]
