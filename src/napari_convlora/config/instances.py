"""How an instance head's maps become objects: the seeded watershed's settings, stored with the model (no torch).

An instance head (``modeling/instance_head.py``) predicts three maps per pixel, each in 0..1 (micro-sam's instance
decoder predicts the same kinds of map): the foreground probability, the closeness to the object's centre (1 at the
centre, falling to 0 at the object's farthest pixel) and the depth inside the object (the distance to the object's
edge over its largest value: 1 at the innermost pixel, near 0 at the edge). ``instances/watershed.py`` turns them
into objects: one seed at each peak of the foreground's distance transform weighted by the learned centre and depth
maps (which fall at the seam between touching objects, where the distance transform alone does not), grown by a
watershed of that surface inside the foreground.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

#: The maps of an instance head, in channel order.
INSTANCE_MAPS = ("foreground", "centre", "depth")


@dataclass
class InstanceConfig:
    """The post-processing of an instance head's maps (``instances.watershed.instances_from_maps``).

    foreground: the foreground probability above which a pixel belongs to an object.
    min_distance: the least distance in pixels between two seeds (two objects' centres), at the model's input scale.
    min_size: objects smaller than this many pixels (at the model's input scale) are dropped.
    chosen_on: ``"default"`` (the values above were not tuned) or ``"validation"`` (foreground and min_distance
        chosen on the run's validation split, by the best F1 at IoU 0.5).
    """

    foreground: float = 0.5
    min_distance: int = 3
    min_size: int = 8
    chosen_on: str = "default"

    def __post_init__(self) -> None:
        self.foreground = float(self.foreground)
        if not 0.0 < self.foreground < 1.0:
            raise ConfigError(f"the instance foreground threshold must be in (0, 1), got {self.foreground}")
        self.min_distance = int(self.min_distance)
        if self.min_distance < 1:
            raise ConfigError(f"the instance minimum distance must be >= 1 pixel, got {self.min_distance}")
        self.min_size = int(self.min_size)
        if self.min_size < 0:
            raise ConfigError(f"the instance minimum size must be >= 0 pixels, got {self.min_size}")
        if self.chosen_on not in ("default", "validation"):
            raise ConfigError(f"chosen_on must be 'default' or 'validation', got {self.chosen_on!r}")
