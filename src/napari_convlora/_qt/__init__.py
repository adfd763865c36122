"""Qt widgets of the napari plugin. Thin: they read layers, call the Qt-free core in a worker thread and
show what happens. Importing this package must not import torch (napari's plugin menu stays fast)."""
