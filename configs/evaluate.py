"""Metrics report for one or more checkpoints (side by side).

    python -m pal_jax.main --config=configs/evaluate.py:tiny --workdir=W --config.eval.checkpoints=stage1=W
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(preset="tiny"):
    return common.base_config("evaluate", preset or "tiny")
