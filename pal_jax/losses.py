"""Pure loss functions. Log-probabilities are computed in float32 whatever the activation dtype."""
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


def sft_loss_sums(logits, targets, weights, task, num_tasks: int):
    """Cross-entropy on target tokens only, as sums so that micro-batches and devices add up exactly.

    Returns (total_nll, total_tokens, per_task_nll [num_tasks], per_task_tokens [num_tasks]).
    """
    nll = -token_logprobs(logits, targets) * weights  # [B, T]
    row_nll, row_tok = nll.sum(-1), weights.sum(-1)
    onehot = jax.nn.one_hot(task, num_tasks, dtype=jnp.float32)  # [B, K]
    return row_nll.sum(), row_tok.sum(), onehot.T @ row_nll, onehot.T @ row_tok
