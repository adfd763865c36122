"""Conventions shared by every part of the core (no torch, no Qt)."""

#: Label value meaning "not annotated": ignored by every loss and metric.
IGNORE_INDEX = -1

#: SAM's pixel normalisation, for RGB images in 0..255 (segment_anything.modeling.Sam).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

#: SAM's patch size: the image embedding grid is input_size / 16.
PATCH_SIZE = 16

#: Prompts carried through a stack (``self_training/through_stack.py``): the smallest IoU between an object's masks
#: on neighbouring planes that carries it on (below it, the object ended).
STACK_IOU = 0.5
