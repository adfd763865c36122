"""Instances of touching objects (numpy, scipy and scikit-image; no torch, no Qt).

- :mod:`.targets`: what an instance head learns: foreground, centre and depth maps made from instance ids;
- :mod:`.watershed`: the objects in those maps: seeds at the peaks of the weighted distance transform, grown by a
  watershed;
- :mod:`.metrics`: how predicted objects match true ones (F1, precision, recall at IoU thresholds, as StarDist and
  cellpose score them).
"""

from .targets import object_classes, object_maps, separate_objects
from .watershed import instances_from_maps

__all__ = ["instances_from_maps", "object_classes", "object_maps", "separate_objects"]
