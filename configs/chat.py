"""Interactive chat with a persona; shows the selected persona beside each reply.

    python -m pal_jax.main --config=configs/chat.py:tiny --workdir=STAGE1_WORKDIR --config.predict.persona_file=persona.txt
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(preset="tiny"):
    return common.base_config("chat", preset or "tiny")
