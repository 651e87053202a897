"""Preference pairs from a Stage 1 model: rejected = its reply to the persona-free prompt.

    python -m pal_jax.main --config=configs/make_pairs.py:tiny --workdir=W2 --config.init_from=STAGE1_WORKDIR
"""

from configs import common


def get_config(preset="tiny"):
    return common.base_config("make_pairs", preset or "tiny")
