"""Self-training from weak labels (WeSAM, METHODS.md 3): SAM's encoder adapted through its own promptable decoder
from boxes, points and coarse masks, with an anchor (the loaded SAM), a teacher (weak view) and a student (strong
view) in one network.

- ``data.py``: images and their weak labels -> the planes and objects a run reads (``prepare_weak_data``);
- ``crops.py``: training crops around the objects, and the prompts SAM's prompt encoder takes;
- ``views.py``: the weak (flips) and strong (photometric) views;
- ``loop.py``: the training loop (``self_train``), yielding the same events as supervised training;
- ``evaluation.py``: prompt mIoU against evaluation labels.
"""

from .data import WeakData, WeakPair, prepare_weak_data
from .evaluation import evaluate_prompts
from .loop import self_train

__all__ = ["WeakData", "WeakPair", "evaluate_prompts", "prepare_weak_data", "self_train"]
