"""Select then Generate on a file or the test split; writes predictions JSONL.

    python -m pal_jax.main --config=configs/predict.py:tiny --workdir=STAGE1_WORKDIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(preset="tiny"):
    return common.base_config("predict", preset or "tiny")
