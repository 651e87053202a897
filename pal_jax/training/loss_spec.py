"""The names of the Stage 2 preference losses and the syntax of stage2.loss_type, without jax.

config.py validates stage2.loss_type with parse_loss_type before jax is imported; losses.py computes the losses
named here. One place for both, so the allowed names cannot drift.

stage2.loss_type is one loss name, or a comma-separated list of `name` or `name:weight` entries whose per-pair
losses are added with those weights (weight 1 when left out), e.g. "sigmoid:1,ipo:0.5". On the command line:
--config.stage2.loss_type=sigmoid:1,ipo:0.5 (a plain string: ml_collections does not evaluate it).
"""
from __future__ import annotations

import math

# The formulas and their sources: losses.dpo_per_pair.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero")
LOSS_TYPE_SYNTAX = (f"one of {DPO_LOSS_TYPES}, or a comma-separated list of them as name or name:weight (a finite "
                    f"weight > 0, 1 when left out; each name once), e.g. 'sigmoid:1,ipo:0.5'")


def parse_loss_type(spec) -> tuple[tuple[str, float], ...]:
    """stage2.loss_type -> ((name, weight), ...) in the order given.

    Also takes an already parsed tuple of (name, weight) pairs (returned as a tuple). Raises ValueError naming
    stage2.loss_type, the bad entry and what is expected.
    """
    if isinstance(spec, (tuple, list)):
        entries = [f"{n}:{w!r}" for n, w in spec]
    elif isinstance(spec, str):
        entries = spec.split(",")
    else:
        raise ValueError(f"config.stage2.loss_type = {spec!r}: expected {LOSS_TYPE_SYNTAX}")
    out: list[tuple[str, float]] = []
    for raw in entries:
        entry = raw.strip()
        name, sep, weight_text = entry.partition(":")
        name = name.strip()
        why = None
        if name not in DPO_LOSS_TYPES:
            why = "unknown loss name" if name else "empty entry"
        elif any(name == n for n, _ in out):
            why = "named twice"
        weight = 1.0
        if why is None and sep:
            try:
                weight = float(weight_text)
            except ValueError:
                why = "the weight is not a number"
            else:
                if not (math.isfinite(weight) and weight > 0):
                    why = "the weight must be finite and > 0"
        if why is not None:
            raise ValueError(f"config.stage2.loss_type = {spec!r}: expected {LOSS_TYPE_SYNTAX}; bad entry "
                             f"{entry!r}: {why}")
        out.append((name, weight))
    return tuple(out)
