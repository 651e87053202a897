"""Token and sequence log-probabilities, in float32 whatever the activation dtype; the LM head on a target window.
Shared by the losses (training), decoding and candidate scoring (inference)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets[b, t] | prefix) for every position, float32 [B, T]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def sequence_logprobs(logits, targets, weights):
    """Summed log-prob of the weighted (target) tokens of each row: float32 [B]."""
    return jnp.sum(token_logprobs(logits, targets) * weights, axis=-1)


def window_logits(model, hidden, batch):
    """(logits, targets, weights) on the batch's target window (data.pipeline.add_window) when it has one: the LM
    head and the softmax run on W positions per row instead of L. Without a window: every position."""
    if "win_idx" not in batch:
        return model.logits(hidden), batch["targets"], batch["weights"]
    h = jnp.take_along_axis(hidden, batch["win_idx"][..., None], axis=1)
    return model.logits(h), batch["win_targets"], batch["win_weights"]
