"""Preference pairs from a Stage 1 model: rejected = its reply to the persona-free prompt.

    python -m pal_jax.main --config=configs/make_pairs.py:tiny --workdir=W2 --config.init_from=STAGE1_WORKDIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(preset="tiny"):
    return common.base_config("make_pairs", preset or "tiny")
