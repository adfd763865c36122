"""The errors the core raises for things a user can fix: each message names the file or the option.

Torch-free, so that the command line can report them without importing torch.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A file that cannot be used as asked; the message names the file and what was expected."""


class ConfigError(ValueError):
    """Settings that are invalid or inconsistent (from a form, the command line or a file's record)."""


class TrainingError(RuntimeError):
    """Training cannot start or go on (for example a NaN loss, or data prepared for another recipe);
    nothing already saved is lost."""
