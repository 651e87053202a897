"""Errors main.py prints as one line (no traceback without --traceback): ConfigError for the user's input (a config
key, a file it names), CheckpointError for what is not."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved (disk full, permissions) or none of the saved ones is readable: the message
    names the checkpoint folder and what to do. main.py prints it as `error: ...` and exits 1."""


class ConfigError(ValueError):
    """A config key or a file it names is wrong: the message names the key and what was expected."""
