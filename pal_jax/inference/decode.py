"""Batched decoding with a KV cache (candidate scoring, which shares its prefill: inference/scoring.py).

Prompts are left-padded to a fixed bucket length P (mask False on padding), so the last prompt token of every row
sits at slot P-1 and all rows decode in lock-step: slot P+i holds the i-th new token. The decode loop is a
`lax.while_loop` that stops when every row has emitted EOS or max_new_tokens is reached. Everything is a pure
function of (params, arrays): jit once per (batch, prompt length, max_new_tokens) shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG = -1e30
METHODS = ("greedy", "sample", "beam")  # predict.method


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    method: str = "greedy"  # greedy | sample | beam
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    beam_width: int = 4
    length_penalty: float = 1.0  # beam: score / length**alpha
    max_new_tokens: int = 32

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"sampling.method = {self.method!r}: expected one of {METHODS}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens = {self.max_new_tokens}: expected >= 1")
        if self.method == "sample" and self.temperature <= 0:
            raise ValueError(f"sampling.temperature = {self.temperature}: expected > 0 (or method='greedy')")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p = {self.top_p}: expected in (0, 1]")
        if self.method == "beam" and self.beam_width < 1:
            raise ValueError(f"sampling.beam_width = {self.beam_width}: expected >= 1")


def left_pad(seqs: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [B, length], mask [B, length]) left-padded; longer lists keep their last tokens."""
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        s = list(s)[-length:]
        if s:
            tokens[i, length - len(s):] = s
            mask[i, length - len(s):] = True
    return tokens, mask


def _is_stop(tok, eos_id):
    """tok == eos_id, or tok in eos_id when it is a tuple of stop ids (e.g. eos and a chat end-of-turn token)."""
    if isinstance(eos_id, (tuple, list)):
        return jnp.isin(tok, jnp.asarray(eos_id, jnp.int32))
    return tok == eos_id


def _positions(mask):
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def prefill(model, tokens, mask, total_len: int):
    """Run the prompt once into a fresh cache of total_len slots. Returns (last logits [B,V], cache, key_mask,
    next position [B])."""
    b, p = tokens.shape
    cache = model.init_cache(b, total_len)
    key_mask = jnp.zeros((b, total_len), bool).at[:, :p].set(mask)
    logits, _, cache = model.decode(tokens, cache, positions=_positions(mask), cache_index=jnp.int32(0),
                                    key_mask=key_mask, last_only=True)
    next_pos = jnp.sum(mask, axis=-1).astype(jnp.int32)
    return logits[:, -1].astype(jnp.float32), cache, key_mask, next_pos


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become NEG."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, NEG, logits)
    return logits


def _decode_loop(model, tokens, mask, rng, cfg: SamplingConfig, eos_id, pad_id: int):
    b, p = tokens.shape
    n = cfg.max_new_tokens
    logits, cache, key_mask, pos = prefill(model, tokens, mask, p + n)
    out = jnp.full((b, n), pad_id, jnp.int32)

    def pick(logits, key):
        if cfg.method == "greedy":
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
                                      ).astype(jnp.int32)

    def cond(state):
        i, _, _, _, _, done, _, _ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, logits, cache, key_mask, pos, done, out, rng = state
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, pad_id, pick(logits, key))
        out = out.at[:, i].set(tok)
        done = done | _is_stop(tok, eos_id)
        key_mask = key_mask.at[:, p + i].set(True)
        new_logits, _, cache = model.decode(tok[:, None], cache, positions=pos[:, None], cache_index=p + i,
                                            key_mask=key_mask)
        return i + 1, new_logits[:, -1].astype(jnp.float32), cache, key_mask, pos + 1, done, out, rng

    state = (jnp.int32(0), logits, cache, key_mask, pos, jnp.zeros((b,), bool), out, rng)
    state = jax.lax.while_loop(cond, body, state)
    return state[6]


def _beam_loop(model, tokens, mask, cfg: SamplingConfig, eos_id, pad_id: int):
    """Beam search: each row keeps `beam_width` hypotheses; finished ones keep their score and emit pad."""
    b, p = tokens.shape
    w, n = cfg.beam_width, cfg.max_new_tokens
    logits, cache, key_mask, pos = prefill(model, tokens, mask, p + n)
    rep = lambda x: jnp.repeat(x, w, axis=0)  # noqa: E731  [B, ...] -> [B*W, ...]
    logits, key_mask, pos = rep(logits), rep(key_mask), rep(pos)
    cache = jax.tree.map(rep, cache)
    # only beam 0 is live at the start, so the first expansion does not pick W copies of one token
    scores = jnp.tile(jnp.array([0.0] + [NEG] * (w - 1), jnp.float32), b)
    out = jnp.full((b * w, n), pad_id, jnp.int32)
    done = jnp.zeros((b * w,), bool)
    lengths = jnp.zeros((b * w,), jnp.int32)

    def cond(state):
        return (state[0] < n) & ~jnp.all(state[6])

    def body(state):
        i, logits, cache, key_mask, pos, scores, done, out, lengths = state
        v = logits.shape[-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        # a finished beam may only extend with pad at no cost
        ext = jnp.where(done[:, None], jnp.where(jnp.arange(v) == pad_id, 0.0, NEG)[None], logp)
        cand = (scores[:, None] + ext).reshape(b, w * v)
        top_scores, top_idx = jax.lax.top_k(cand, w)  # [B, W]
        src_beam = top_idx // v + (jnp.arange(b) * w)[:, None]
        src = src_beam.reshape(-1)
        tok = (top_idx % v).reshape(-1).astype(jnp.int32)
        cache = jax.tree.map(lambda x: x[src], cache)
        out, done, lengths = out[src], done[src], lengths[src]
        key_mask, pos = key_mask[src], pos[src]
        out = out.at[:, i].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_stop(tok, eos_id)
        key_mask = key_mask.at[:, p + i].set(True)
        new_logits, _, cache = model.decode(tok[:, None], cache, positions=pos[:, None], cache_index=p + i,
                                            key_mask=key_mask)
        return (i + 1, new_logits[:, -1].astype(jnp.float32), cache, key_mask, pos + 1, top_scores.reshape(-1),
                done, out, lengths)

    state = (jnp.int32(0), logits, cache, key_mask, pos, scores, done, out, lengths)
    _, _, _, _, _, scores, done, out, lengths = jax.lax.while_loop(cond, body, state)
    norm = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** cfg.length_penalty
    best = jnp.argmax(norm.reshape(b, w), axis=-1) + jnp.arange(b) * w
    return out[best]


def generate(model, tokens, mask, rng, cfg: SamplingConfig, eos_id, pad_id: int):
    """New tokens [B, max_new_tokens] for left-padded prompts; after EOS a row holds pad_id.

    eos_id: one stop id, or a tuple of them (a row stops at the first of any; the stop token is kept in the row)."""
    if cfg.method == "beam":
        return _beam_loop(model, tokens, mask, cfg, eos_id, pad_id)
    return _decode_loop(model, tokens, mask, rng, cfg, eos_id, pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "eos_id", "pad_id"))
def generate_jit(graphdef, params, tokens, mask, rng, *, cfg: SamplingConfig, eos_id, pad_id: int):
    return generate(nnx.merge(graphdef, params), tokens, mask, rng, cfg, eos_id, pad_id)


def default_rng(seed: int = 0) -> Any:
    return jax.random.key(seed)
