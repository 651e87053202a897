"""Optimizer: AdamW with warmup + decay, global-norm clipping, decay only on matrices, optional frozen params.

Gradient accumulation is done inside the jitted train step (a scan over micro-batches, see train.py), so the
optimizer sees one update per step and its state is independent of the accumulation factor.
"""
from __future__ import annotations

from typing import Callable

import jax
import optax


def schedule(train_config) -> optax.Schedule:
    t = train_config
    peak, end = t.lr, t.lr * t.end_lr_ratio
    decay_steps = max(1, t.steps - t.warmup_steps)
    if t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.end_lr_ratio)
    elif t.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if t.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, t.warmup_steps)
    return optax.join_schedules([warmup, decay], [t.warmup_steps])


def _decay_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(train_config, trainable: Callable[[tuple, object], bool] | None = None
                   ) -> optax.GradientTransformation:
    """AdamW chain. `trainable(path, leaf) -> bool` freezes the params it returns False for (zero updates)."""
    t = train_config
    chain = []
    if t.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(t.clip_norm))
    chain.append(optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=1e-8, weight_decay=t.weight_decay,
                             mask=_decay_mask))
    tx = optax.chain(*chain)
    if trainable is not None:
        labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda p, x: "train" if trainable(p, x) else "frozen", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
