"""Stage 1, Persona-aware Learning: multi-task SFT on select and generate examples.

    python -m pal_jax.main --config=configs/stage1.py:tiny --workdir=/tmp/pal_s1
"""

from configs import common


def get_config(preset="tiny"):
    return common.base_config("stage1", preset or "tiny")
