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


def flat_window_sums(model, hidden, batch, weight_keys) -> list[jax.Array]:
    """Per-row sums of the target log-probs on a flat window (data.pipeline.add_flat_window): one float32 [R] per
    weight key. Each group of G = win_group.shape[1] rows gathers its G x W listed positions from its own rows'
    hidden states ([R, L, d] viewed as [R / G, G * L, d]: local to a data shard), runs the LM head on them only,
    and adds each entry's log-prob into its row."""
    R, L, d = hidden.shape
    group, width = batch["win_group"].shape[1], batch["win_idx"].shape[1]
    n, m = R // group, group * width
    h = jnp.take_along_axis(hidden.reshape(n, group * L, d), batch["win_idx"].reshape(n, m)[..., None], axis=1)
    tok = token_logprobs(model.logits(h), batch["win_targets"].reshape(n, m))  # [R / G, G * W]
    member = batch["win_row"].reshape(n, m)[..., None] == jnp.arange(group)  # [R / G, G * W, G]
    # a masked sum, not a matmul: exact float32 adds on every backend (a TPU's default matmul rounds to bfloat16)
    return [jnp.sum(jnp.where(member, (tok * batch[k].reshape(n, m))[..., None], 0.0), axis=1).reshape(R)
            for k in weight_keys]
