"""Stage 1, Persona-aware Learning: multi-task SFT on select and generate examples.

    python -m pal_jax.main --config=configs/stage1.py:tiny --workdir=/tmp/pal_s1
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(preset="tiny"):
    return common.base_config("stage1", preset or "tiny")
