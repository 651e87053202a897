"""Select then Generate on a file or the test split; writes predictions JSONL.

    python -m pal_jax.main --config=configs/predict.py:tiny --workdir=STAGE1_WORKDIR
"""

from configs import common


def get_config(preset="tiny"):
    return common.base_config("predict", preset or "tiny")
