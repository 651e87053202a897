"""Metrics report for one or more checkpoints (side by side).

    python -m pal_jax.main --config=configs/evaluate.py:tiny --workdir=W --config.eval.checkpoints=stage1=W
"""

from configs import common


def get_config(preset="tiny"):
    return common.base_config("evaluate", preset or "tiny")
