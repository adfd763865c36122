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


#: Errors whose message is written for the user (it names the file or option and what was expected).
USER_ERRORS = (ConfigError, CheckpointError, TrainingError, ValueError, OSError)


def describe_error(error: BaseException) -> str:
    """One line for a person: the message of an error written for the user; for anything else (a bug), its
    type and message and a request to report it."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split())
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "out of memory" in text.lower()):
        return "out of memory; try a smaller input size or batch size, or an image split into parts"
    if isinstance(error, USER_ERRORS) and text:
        return text
    return f"unexpected {type(error).__name__}: {text or 'no message'} (a bug: please report it with the log)"
