"""Candidate scoring: the log-probs of K continuations of each prompt (the Select step's persona candidates, the
gold reply's perplexity, ConvAI2's Hits@1), the prompt run once through the model and its KV cache shared by the K
continuations."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pal_jax.inference.decode import prefill
from pal_jax.model.logprobs import token_logprobs


def candidate_token_logprobs(model, tokens, mask, cand_tokens, cand_mask):
    """Per-token log-probs [B, K, C] of K continuations per prompt (0 on padding), the prompt run once.

    tokens/mask [B, P] left-padded prompts; cand_tokens/cand_mask [B, K, C] right-padded continuations.
    The prompt's KV cache is computed once and shared by its K continuations (broadcast, not recomputed).
    """
    b, p = tokens.shape
    _, k, c = cand_tokens.shape
    last, cache, key_mask, pos = prefill(model, tokens, mask, p + c)
    rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731
    cache = jax.tree.map(rep, cache)
    ct = cand_tokens.reshape(b * k, c)
    cm = cand_mask.reshape(b * k, c)
    km = rep(key_mask).at[:, p:].set(cm)
    cpos = rep(pos)[:, None] + jnp.arange(c)[None, :]
    logits, _, _ = model.decode(ct, cache, positions=cpos, cache_index=jnp.int32(p), key_mask=km)
    # token j of a candidate is predicted by the logits before it: the prompt's last logits for j = 0
    pred = jnp.concatenate([rep(last)[:, None], logits[:, :-1].astype(jnp.float32)], axis=1)
    return (token_logprobs(pred, ct) * cm).reshape(b, k, c)


def score_candidates(model, tokens, mask, cand_tokens, cand_mask):
    """(sum_logprob [B, K], mean_logprob [B, K]) over each continuation's real tokens (candidate_token_logprobs)."""
    lp = candidate_token_logprobs(model, tokens, mask, cand_tokens, cand_mask)
    total = lp.sum(-1)
    return total, total / jnp.maximum(cand_mask.sum(-1), 1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_candidates_jit(graphdef, params, tokens, mask, cand_tokens, cand_mask):
    return score_candidates(nnx.merge(graphdef, params), tokens, mask, cand_tokens, cand_mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def candidate_token_logprobs_jit(graphdef, params, tokens, mask, cand_tokens, cand_mask):
    return candidate_token_logprobs(nnx.merge(graphdef, params), tokens, mask, cand_tokens, cand_mask)
