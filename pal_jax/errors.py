"""Errors main.py prints as one line (no traceback without --traceback) that are not the user's input."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved (disk full, permissions) or none of the saved ones is readable: the message
    names the checkpoint folder and what to do. main.py prints it as `error: ...` and exits 1."""
