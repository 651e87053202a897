"""The full PAL pipeline: Stage 1 -> pairs -> Stage 2 -> Select-then-Generate evaluation of both -> report.

    python -m pal_jax.main --config=configs/pipeline.py:tiny --workdir=runs/pal
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(preset="tiny"):
    return common.base_config("pipeline", preset or "tiny")
