"""The full PAL pipeline: Stage 1 -> pairs -> Stage 2 -> Select-then-Generate evaluation of both -> report.

    python -m pal_jax.main --config=configs/pipeline.py:tiny --workdir=runs/pal

The tiny preset's pipeline runs Stage 1 as configs/stage1.py does (600 steps), then pairs from the first 1024
training turns and 100 Stage 2 steps (configs/stage2.py: 150 steps over 2048 turns). Other presets keep the base
settings.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(preset="tiny"):
    c = common.base_config("pipeline", preset or "tiny")
    if c.preset == "tiny":
        c.stage2.steps = 100
        c.stage2.max_pair_turns = 1024
    return c
