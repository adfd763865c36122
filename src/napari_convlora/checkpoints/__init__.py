"""Files that hold models: SAM checkpoints (``sam_files``: read safely, write tiny or random ones), the built-in
small SAM (``builtin``), adapter and bundle files (``model_files``, with ``format_v1`` for the first format) and
the resumable training state beside them (``training_state``). Import the module you need."""
