"""KV-cache decoding and candidate scoring against direct full-forward computations."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pal_jax.inference import decode as sampling
from pal_jax.inference import scoring
from pal_jax.model.logprobs import token_logprobs
from pal_jax.model.transformer import ModelConfig, Transformer

EOS, PAD = 1, 0


def make(family="llama", seed=0):
    cfg = ModelConfig(family=family, vocab_size=61, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2 if family == "llama" else 4, d_ff=64, max_len=64, tie_embeddings=family == "gpt2")
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # sharper distributions than the 0.02 init so greedy paths are not ties
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 and x.shape[0] == 61 else x, params)
    return graphdef, params


def prompts(rng, n=3, p=9):
    seqs = [list(rng.integers(2, 61, size=int(k))) for k in rng.integers(3, p + 1, size=n)]
    return seqs, sampling.left_pad(seqs, p, PAD)


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
    return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])


def full_logits(graphdef, params, seq, length=32):
    """Logits of a plain causal forward over `seq` (right-padded to a fixed length: one compilation)."""
    fwd = _forward(graphdef)
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(seq)] = seq
    return fwd(params, padded)[0, :len(seq)]


def greedy_by_full_forward(graphdef, params, seq, n):
    """Reference: recompute the whole sequence at every step, no cache, no left padding."""
    seq = list(seq)
    out = []
    for _ in range(n):
        tok = int(jnp.argmax(full_logits(graphdef, params, seq)[-1]))
        out.append(tok)
        if tok == EOS:
            break
        seq.append(tok)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_cache_equals_full_recompute(family):
    graphdef, params = make(family)
    seqs, (toks, mask) = prompts(np.random.default_rng(0))
    cfg = sampling.SamplingConfig(method="greedy", max_new_tokens=8)
    out = np.asarray(sampling.generate_jit(graphdef, params, toks, mask, jax.random.key(0), cfg=cfg,
                                           eos_id=EOS, pad_id=PAD))
    for row, seq in zip(out, seqs):
        ref = greedy_by_full_forward(graphdef, params, seq, 8)
        assert list(row[:len(ref)]) == ref
        assert all(t == PAD for t in row[len(ref):])  # after EOS (or nothing when no EOS)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_any_of_several_stop_ids_ends_a_row(method):
    """eos_id may be a tuple (e.g. eos and a chat end-of-turn token): a row stops at the first of any of them."""
    graphdef, params = make()
    _, (toks, mask) = prompts(np.random.default_rng(4), n=3)
    cfg = sampling.SamplingConfig(method=method, beam_width=2, max_new_tokens=8)
    free = np.asarray(sampling.generate_jit(graphdef, params, toks, mask, jax.random.key(0), cfg=cfg,
                                            eos_id=60, pad_id=PAD))
    stop = int(free[0, 2])  # the first row's third token becomes a stop token
    assert 60 not in free[0, :3] and stop not in free[0, :2]
    out = np.asarray(sampling.generate_jit(graphdef, params, toks, mask, jax.random.key(0), cfg=cfg,
                                           eos_id=(60, stop), pad_id=PAD))
    for row in out:  # nothing but pad after a row's first stop id
        ends = [i for i, t in enumerate(row) if t in (60, stop)]
        if ends:
            assert all(t == PAD for t in row[ends[0] + 1:]), row
    if method == "greedy":  # greedy rows are the free ones cut after their first stop id
        assert list(out[0]) == list(free[0, :3]) + [PAD] * 5
        for row, ref in zip(out, free):
            ends = [i for i, t in enumerate(ref) if t in (60, stop)]
            n = ends[0] + 1 if ends else len(ref)
            assert list(row[:n]) == list(ref[:n]) and all(t == PAD for t in row[n:])


def test_sampling_filters_reduce_to_greedy():
    graphdef, params = make()
    _, (toks, mask) = prompts(np.random.default_rng(1))
    greedy = sampling.generate_jit(graphdef, params, toks, mask, jax.random.key(0),
                                   cfg=sampling.SamplingConfig(max_new_tokens=6), eos_id=EOS, pad_id=PAD)
    for cfg in (sampling.SamplingConfig(method="sample", top_k=1, max_new_tokens=6),
                sampling.SamplingConfig(method="sample", top_p=1e-6, max_new_tokens=6),
                sampling.SamplingConfig(method="beam", beam_width=1, max_new_tokens=6)):
        out = sampling.generate_jit(graphdef, params, toks, mask, jax.random.key(3), cfg=cfg, eos_id=EOS, pad_id=PAD)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(greedy))


def test_top_k_top_p_filtering():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = sampling.filter_logits(logits, 1.0, 2, 1.0) > -1e29
    assert kept.tolist() == [[True, True, False, False]]
    kept = sampling.filter_logits(logits, 1.0, 0, 0.7) > -1e29  # 0.5 < 0.7 <= 0.8: keep two
    assert kept.tolist() == [[True, True, False, False]]
    kept = sampling.filter_logits(logits, 1.0, 0, 0.5) > -1e29
    assert kept.tolist() == [[True, False, False, False]]


def test_beam_search_scores_at_least_greedy():
    graphdef, params = make(seed=2)
    seqs, (toks, mask) = prompts(np.random.default_rng(2), n=2)
    n = 5
    greedy = np.asarray(sampling.generate_jit(graphdef, params, toks, mask, jax.random.key(0),
                                              cfg=sampling.SamplingConfig(max_new_tokens=n), eos_id=EOS, pad_id=PAD))
    beam = np.asarray(sampling.generate_jit(graphdef, params, toks, mask, jax.random.key(0),
                                            cfg=sampling.SamplingConfig(method="beam", beam_width=4,
                                                                        max_new_tokens=n, length_penalty=0.0),
                                            eos_id=EOS, pad_id=PAD))
    def logp(seq, cont):
        cont = [int(t) for t in cont if t != PAD]
        full = list(seq) + cont
        lp = token_logprobs(full_logits(graphdef, params, full)[:-1], jnp.asarray(full[1:]))
        return float(lp[len(seq) - 1:].sum())

    for s, g, b in zip(seqs, greedy, beam):
        assert logp(s, b) >= logp(s, g) - 1e-4


def test_candidate_scores_match_full_forward():
    graphdef, params = make()
    rng = np.random.default_rng(4)
    seqs, (toks, mask) = prompts(rng, n=2, p=7)
    k, c = 3, 5
    cands = [[list(rng.integers(2, 61, size=int(rng.integers(1, c + 1)))) for _ in range(k)] for _ in seqs]
    ct = np.zeros((2, k, c), np.int32)
    cm = np.zeros((2, k, c), bool)
    for i in range(2):
        for j, x in enumerate(cands[i]):
            ct[i, j, :len(x)], cm[i, j, :len(x)] = x, True
    total, mean = scoring.score_candidates_jit(graphdef, params, toks, mask, ct, cm)
    for i, s in enumerate(seqs):
        for j, x in enumerate(cands[i]):
            full = [int(t) for t in s + x]
            ref = float(token_logprobs(full_logits(graphdef, params, full)[:-1], jnp.asarray(full[1:]))[len(s) - 1:].sum())
            assert float(total[i, j]) == pytest.approx(ref, abs=1e-4)
            assert float(mean[i, j]) == pytest.approx(ref / len(x), abs=1e-4)


def test_one_compilation_per_shape():
    graphdef, params = make()
    _, (toks, mask) = prompts(np.random.default_rng(5))
    cfg = sampling.SamplingConfig(method="sample", max_new_tokens=4, temperature=0.7)
    fn = sampling.generate_jit
    before = fn._cache_size()
    for seed in range(3):
        fn(graphdef, params, toks, mask, jax.random.key(seed), cfg=cfg, eos_id=EOS, pad_id=PAD)
    assert fn._cache_size() == before + 1
