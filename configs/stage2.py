"""Stage 2, Persona Alignment: DPO against the frozen Stage 1 model + embedding alignment.

    python -m pal_jax.main --config=configs/stage2.py:tiny --workdir=W2 --config.init_from=STAGE1_WORKDIR
"""

from configs import common


def get_config(preset="tiny"):
    return common.base_config("stage2", preset or "tiny")
