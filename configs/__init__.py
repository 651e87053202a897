"""pal_jax's configs, importable as a package (`from configs import common, pipeline`) from the repository root.

Each file is also a config file for `python -m pal_jax.main --config=configs/FILE.py:PRESET`."""
