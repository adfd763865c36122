"""The napari-facing side: layer data in and out, sample data, and the jobs the widgets run off the GUI
thread. May import napari, never Qt; torch only inside functions."""
