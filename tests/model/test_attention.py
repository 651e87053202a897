"""model.attention: jax.nn.dot_product_attention and the splash kernel (interpret mode on this CPU) against the
default xla attention, forward logits and gradients, with padding keys, packed segments, a sliding window and
grouped-query heads; the decode path; the refusals; the choice being the run's, not the checkpoint's."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import decode_in_pieces, tiny_config
from pal_jax.config import validate
from pal_jax.core import mesh as mesh_lib
from pal_jax.core.errors import ConfigError
from pal_jax.model import transformer
from pal_jax.model.spec import model_config
from pal_jax.model.transformer import ModelConfig, Transformer

VOCAB = 61
BASE = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=512)
LOGIT_TOL = 1e-5  # float32; measured: dot_product_attention 0 (bitwise), splash about 1.4e-6 (|logits| about 3)
GRAD_RTOL = 4e-6  # max |grad diff| / max |grad|; measured: at most about 1e-6
# cheaper CPU codegen (as tests/training/test_aot.py): compile time halves; both sides of a comparison get it
FAST_CPU = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
    """fn(*args), jitted and compiled with FAST_CPU."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_CPU)(*args)


def _graphdef_and_params(cfg: ModelConfig, seed: int = 0):
    """numpy-random params (std 0.3, so attention is far from uniform) and the graphdef for cfg."""
    rng = np.random.RandomState(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return graphdef, jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state)


def _logits_and_grads(cfg: ModelConfig, attention: str, tokens, real=None, **kw):
    """(logits [B,T,V], grads of a fixed weighting of the logits of the real positions, logits without key_mask and
    segment_ids) with cfg's params (the same for every `attention`), through the training forward."""
    graphdef, params = _graphdef_and_params(cfg)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(dataclasses.replace(cfg, attention=attention),
                                                             rngs=nnx.Rngs(0))))[0]
    weight = jnp.sin(jnp.arange(tokens.size * VOCAB, dtype=jnp.float32)).reshape(*tokens.shape, VOCAB)
    if real is not None:  # padding queries never reach a loss (module doc of transformer: their outputs differ)
        weight = weight * jnp.asarray(real)[..., None]

    def run(params, tokens, kw):
        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, **kw)[0]
            return jnp.sum(logits * weight), logits
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        unmasked = nnx.merge(graphdef, params)(tokens, positions=kw.get("positions"))[0]
        return logits, grads, unmasked

    logits, grads, unmasked = _run(run, params, jnp.asarray(tokens), {k: jnp.asarray(v) for k, v in kw.items()})
    return np.asarray(logits), jax.tree.map(np.asarray, grads), np.asarray(unmasked)


def _compare(cfg, attention, tokens, real=None, **kw):
    """(max |logit diff| on real positions, max |grad diff| / max |grad|) of `attention` against xla, after checking
    that key_mask / segment_ids (when given) change xla's logits: the comparison sees the masks."""
    ref, ref_g, unmasked = _logits_and_grads(cfg, "xla", tokens, real, **kw)
    got, got_g, _ = _logits_and_grads(cfg, attention, tokens, real, **kw)
    rows = np.ones(tokens.shape, bool) if real is None else real
    if "key_mask" in kw or "segment_ids" in kw:
        assert np.abs(unmasked - ref)[rows].max() > 0.1
    assert np.isfinite(got).all()  # padding queries too
    d_logits = float(np.abs(got - ref)[rows].max())
    g_max = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_g))
    d_grads = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)))
    assert g_max > 1.0 and np.abs(ref[rows]).max() > 1.0  # not vacuous
    return d_logits, d_grads / g_max


def _tokens(b, t, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (b, t)).astype(np.int32)


def _left_padding(b, t, pads):
    mask = np.ones((b, t), bool)
    for i, p in enumerate(pads):
        mask[i, :p] = False
    return mask


def _packed(b, t, starts, real=None):
    """(segment ids, positions) [b, t]: row i's segments begin at starts[i] (ids 0, 1, ...), positions restart at
    each; with real (left padding), a row's first segment starts at its first real token."""
    seg = np.zeros((b, t), np.int32)
    first = np.zeros(b, int) if real is None else (~real).sum(1)
    pos = np.maximum(np.arange(t)[None, :] - first[:, None], 0).astype(np.int32)
    for i, row in enumerate(starts):
        for j, s in enumerate(row):
            seg[i, s:] = j + 1
            pos[i, s:] = np.arange(t - s)
    return seg, pos


def _logits(cfg, tokens, **kw):
    graphdef, params = _graphdef_and_params(cfg)
    fn = lambda p, tokens, kw: nnx.merge(graphdef, p)(tokens, **kw)[0]  # noqa: E731
    return np.asarray(_run(fn, params, jnp.asarray(tokens), {k: jnp.asarray(v) for k, v in kw.items()}))


# ---------------------------------------------------------------------------------------------------------------
# dot_product_attention


@pytest.mark.parametrize("attention,t,window,pads,starts", [
    # 4 query heads on 2 key-value heads; row 0 left-padded (key_mask), row 1 packed (segment_ids, positions
    # restarting), row 2 both
    ("dot_product_attention", 16, 5, (5, 0, 3), ((), (6, 13), (9,))),
    # a length that chunks (80 tokens: 3 chunks of 32, the last 16) against the whole matrix
    ("xla_chunked", 80, 40, (11, 0, 3), ((), (30, 61), (45,))),
])
def test_training_forward_matches_xla(attention, t, window, pads, starts):
    """model.attention's training forward and gradients against xla's, with a sliding window, left padding and
    packed segments."""
    b = 3
    cfg = dataclasses.replace(BASE, n_layers=1, sliding_window=window)
    real = _left_padding(b, t, pads)
    seg, pos = _packed(b, t, starts, real)
    d_logits, d_grads = _compare(cfg, attention, _tokens(b, t), real, key_mask=real, segment_ids=seg, positions=pos)
    print(f"{attention} at T={t}: logits max|diff| {d_logits:.3g}, grads max|diff|/max|grad| {d_grads:.3g}")
    assert d_logits <= LOGIT_TOL and d_grads <= GRAD_RTOL


def test_xla_causal_chunks_match_the_whole_score_matrix():
    """attend_causal (xla_chunked's training forward: query chunks, each against the keys up to its end) against attend
    over the whole matrix: values and gradients of the real queries, with left padding, packed segments behind a
    shared prompt (share_prompt's mask), a sliding window, and chunks that do not divide T."""
    b, t, h, kv, hd = 3, 45, 4, 2, 8
    rng = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rng.normal(0, 1.0, (b, t, n, hd)), jnp.float32) for n in (h, kv, kv))
    real = _left_padding(b, t, (7, 0, 0))
    seg = np.zeros((b, t), np.int32)
    seg[1, 20:33], seg[1, 33:] = 1, 2  # row 1: a prompt of 20 (segment 0, shared), then two branches
    shared = seg == 0
    causal = np.tril(np.ones((t, t), bool))
    window = causal & (np.arange(t)[:, None] - np.arange(t)[None, :] < 9)
    same = (seg[:, :, None] == seg[:, None, :]) | shared[:, None, :]
    for m in (causal[None] & real[:, None, :] & same, window[None] & real[:, None, :]):
        mask = jnp.asarray(m)
        w = jnp.asarray(rng.normal(0, 1.0, (b, t, h, hd)) * real[..., None, None], jnp.float32)
        def check(fn):  # jitted: op by op, the dozens of small ops of each chunk took ~40 s of dispatch
            return jax.jit(lambda q, k, v: (fn(q, k, v), *jax.value_and_grad(
                lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2))(q, k, v)))

        out_ref, ref, ref_g = check(lambda q, k, v: transformer.attend(q, k, v, mask))(q, k, v)
        for chunk in (8, 16, 44):
            out, got, got_g = check(lambda q, k, v: transformer.attend_causal(q, k, v, mask, chunk))(q, k, v)
            assert float(jnp.max(jnp.abs(out - out_ref)[real])) <= 1e-5, chunk
            assert abs(float(got) - float(ref)) <= 1e-4 * max(1.0, abs(float(ref))), chunk
            for g, r in zip(got_g, ref_g):
                assert float(jnp.max(jnp.abs(g - r))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(r)))), chunk
    assert transformer.causal_chunk(96) == transformer.CAUSAL_CHUNK  # 3 chunks of 32
    assert transformer.causal_chunk(4096) == 256  # at most CAUSAL_MAX_CHUNKS chunks


def test_dot_product_attention_decode_matches_full_forward():
    """Transformer.decode with dot_product_attention (the whole [B,1,T,S] mask: queries at cache slots
    cache_index..): a left-padded prefill, a 3-token chunk at a non-zero cache index, then one token at a time in a
    fori_loop (traced cache_index), with one key-value head and a sliding window of 4, equal the full forward's
    logits (and those equal xla's)."""
    cfg = dataclasses.replace(BASE, n_kv_heads=1, sliding_window=4, attention="dot_product_attention")
    graphdef, params = _graphdef_and_params(cfg)
    b, t, p, slots = 3, 12, 5, 15
    tokens = _tokens(b, t, seed=2)
    mask = _left_padding(b, t, (0, 3, 5))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    key_mask = np.zeros((b, slots), bool)
    key_mask[:, :t] = mask

    def run(params, tokens, positions, key_mask, mask):
        m = nnx.merge(graphdef, params)
        full = m(tokens, positions=positions, key_mask=mask)[0]
        return full, decode_in_pieces(m, tokens, positions, key_mask, p, slots)[0]

    full, out = _run(run, params, *(jnp.asarray(x) for x in (tokens, positions, key_mask, mask)))
    full, out = np.asarray(full), np.asarray(out)
    xla = _logits(dataclasses.replace(cfg, attention="xla"), tokens, positions=positions, key_mask=mask)
    assert np.abs(full[mask]).max() > 1.0
    diff = float(np.abs(out - full)[mask].max())
    print(f"dot_product_attention decode vs full forward max|diff| = {diff:.3g}")
    assert diff <= LOGIT_TOL
    assert float(np.abs(full - xla)[mask].max()) <= LOGIT_TOL


# ---------------------------------------------------------------------------------------------------------------
# splash (Pallas interpret mode on this CPU)


def test_splash_refuses_a_sequence_not_a_multiple_of_its_block():
    cfg = dataclasses.replace(BASE, attention="splash")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    with pytest.raises(ConfigError, match=r"config.model.attention = 'splash' with a sequence of 200 tokens: "
                                          r"expected a multiple of 128"):
        jax.eval_shape(lambda s, tokens: nnx.merge(graphdef, s).hidden_states(tokens), state,
                       jax.ShapeDtypeStruct((2, 200), jnp.int32))
    assert transformer.splash_block(384) == 128 and transformer.splash_block(768) == 256
    assert transformer.splash_block(8192) == 512


@pytest.mark.slow  # interpret mode: about 5 s per compiled case on this CPU, 5 cases
@pytest.mark.parametrize("case", ["causal", "padding", "packed", "packed_window", "padding_mqa"])
def test_splash_matches_xla(case):
    """Splash (interpret) against xla at T=384 (three 128-blocks: the kernel skips blocks above the diagonal and,
    with a window, far below it): forward and gradients in float32, 4 query heads on 2 key-value heads (mqa: 1)."""
    t, b = 384, 2
    cfg, real, kw = BASE, None, {}
    if case in ("padding", "padding_mqa"):
        real = _left_padding(b, t, (0, 150))  # row 1: its first block all padding
        kw = {"key_mask": real, "positions": np.maximum(np.cumsum(real, 1) - 1, 0).astype(np.int32)}
        if case == "padding_mqa":
            cfg = dataclasses.replace(BASE, n_kv_heads=1)
    if case.startswith("packed"):
        seg, pos = _packed(b, t, ((100, 200, 260), (130,)))
        kw = {"segment_ids": seg, "positions": pos}
        if case == "packed_window":
            cfg = dataclasses.replace(BASE, sliding_window=40)
    d_logits, d_grads = _compare(cfg, "splash", _tokens(b, t, seed=3), real, **kw)
    print(f"splash {case}: logits max|diff| {d_logits:.3g}, grads max|diff|/max|grad| {d_grads:.3g}")
    assert d_logits <= LOGIT_TOL and d_grads <= GRAD_RTOL


@pytest.mark.slow  # interpret mode on 8 devices: about 5 s
def test_splash_under_a_mesh_runs_per_device(monkeypatch):
    """In a train step's shard_activations the kernel runs in shard_map: each device gets its rows (data x fsdp)
    and its heads (tensor), and the result equals xla's."""
    seen = []
    local = transformer._splash_local

    def spy(q, k, v, *segs, **kw):
        seen.append((q.shape, k.shape, [s.shape for s in segs]))
        return local(q, k, v, *segs, **kw)

    monkeypatch.setattr(transformer, "_splash_local", spy)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg = dataclasses.replace(BASE, n_layers=1, sliding_window=40)
    b, t = 4, 128
    seg, pos = _packed(b, t, ((50,), (), (90,), (10, 20)))
    tokens = _tokens(b, t, seed=4)
    out = {}
    for attention in ("xla", "splash"):
        graphdef, params = _graphdef_and_params(cfg)
        graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(dataclasses.replace(cfg, attention=attention),
                                                                 rngs=nnx.Rngs(0))))[0]

        def loss(p, tokens, seg, pos):
            with transformer.shard_activations(mesh):
                logits = nnx.merge(graphdef, p)(tokens, segment_ids=seg, positions=pos)[0]
            return jnp.sum(logits * jnp.cos(logits)), logits

        rows = mesh_lib.batch_sharding(mesh, 2)
        args = jax.device_put((params, *(jnp.asarray(x) for x in (tokens, seg, pos))),
                              (mesh_lib.replicated(mesh), rows, rows, rows))
        (_, logits), grads = _run(jax.value_and_grad(loss, has_aux=True), *args)
        out[attention] = (np.asarray(logits), jax.tree.map(np.asarray, grads))
    hd = cfg.hd
    assert seen and all(s == ((1, t, 2, hd), (1, t, 1, hd), [(1, t), (1, t)]) for s in seen), seen
    d_logits = float(np.abs(out["splash"][0] - out["xla"][0]).max())
    g_max = max(float(np.abs(g).max()) for g in jax.tree.leaves(out["xla"][1]))
    d_grads = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out["splash"][1]),
                                                            jax.tree.leaves(out["xla"][1])))
    print(f"splash on a 2x2x2 mesh: logits max|diff| {d_logits:.3g}, grads max|diff|/max|grad| {d_grads / g_max:.3g}")
    assert d_logits <= LOGIT_TOL and d_grads <= GRAD_RTOL * g_max


# ---------------------------------------------------------------------------------------------------------------
# the config key


def test_attention_choices_are_validated():
    with pytest.raises(ValueError, match=r"ModelConfig.attention = 'flash': expected one of \('xla', 'xla_chunked', "
                                         r"'dot_product_attention', 'splash'\)"):
        dataclasses.replace(BASE, attention="flash")
    with pytest.raises(ConfigError, match=r"config.model.attention = 'flash': expected one of"):
        validate(tiny_config(model__attention="flash"))
    # splash: the training forward's sequence lengths must be multiples of the kernel's block
    with pytest.raises(ConfigError) as e:
        validate(tiny_config(model__attention="splash"))  # buckets (64, 128)
    assert "config.data.buckets = (64, 128): expected multiples of 128 with model.attention='splash'" in str(e.value)
    validate(tiny_config(model__attention="splash", data__buckets=(128,)))
    validate(tiny_config(model__attention="dot_product_attention"))
    validate(tiny_config(model__attention="xla_chunked"))
    c = tiny_config(model__attention="splash", data__buckets=(128,))
    c.mode, c.compile.seq_len = "compile", 96
    with pytest.raises(ConfigError, match=r"config.compile.seq_len = 96: expected multiples of 128"):
        validate(c)
    c.mode = "predict"  # decoding runs xla's attention: no length rule
    c.data.buckets = (64, 128)
    validate(c)


def test_attention_is_the_runs_choice_not_the_checkpoints():
    """A saved model section (with another attention, or none: checkpoints from before the key) builds this run's
    attention; resuming, the pipeline's phase records and the reference cache ignore the key."""
    from pal_jax import pipeline
    from pal_jax.training import loop

    saved = dict(tiny_config(model__attention="splash").model.to_dict(), vocab_size=400)
    assert model_config(saved, 400, "xla").attention == "xla"
    assert model_config(saved, 400).attention == "splash"
    old = {k: v for k, v in saved.items() if k != "attention"}
    assert model_config(old, 400).attention == "xla" and model_config(old, 400, "splash").attention == "splash"

    now = json.loads(tiny_config().to_json_best_effort())
    task = loop.Task(name="stage1", loss_fn=None, train_batch=None, eval_batches=None)
    meta = {"config": json.loads(tiny_config(model__attention="splash").to_json_best_effort())}
    loop._check_resume(meta, now, task, "ckpt")  # no error: only how attention is computed differs
    meta["config"]["model"]["d_model"] = 64
    with pytest.raises(ConfigError, match="config.model.d_model: checkpoint has 64, now 32"):
        loop._check_resume(meta, now, task, "ckpt")
    for phase in ("stage1", "stage2"):
        a = pipeline.phase_inputs(tiny_config(), phase)
        assert a == pipeline.phase_inputs(tiny_config(model__attention="splash"), phase)
        assert "model.d_model" in a and "model.attention" not in a


@pytest.mark.slow  # Stage 1 with splash in interpret mode: about 30 s
def test_checkpoint_trained_with_splash_restores_and_resumes_with_xla(tmp_path):
    """Stage 1 trained with splash (interpret mode here) saves model.attention='splash' in its metadata; restore
    with this run's 'xla' builds an xla model whose logits equal the splash model's on the same params, and the
    run resumes with model.attention='xla'."""
    from pal_jax.core import checkpoint as ckpt_lib
    from pal_jax.training import stage1
    from pal_jax.weights.restore import restore

    over = dict(data__max_len=128, data__buckets=(128,), train__steps=2, train__checkpoint_every=2,
                train__eval_every=2, train__eval_batches=1, compile_cache="off")
    w = str(tmp_path / "s1")
    stage1.run(tiny_config(model__attention="splash", **over), w)
    assert ckpt_lib.load_meta(w)["config"]["model"]["attention"] == "splash"
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    r = restore(w, mesh, attention="xla")
    assert r.spec.cfg.attention == "xla" and r.step == 2
    tokens = jnp.asarray(_tokens(2, 128, seed=5) % r.spec.cfg.vocab_size)
    as_xla = np.asarray(jax.jit(lambda p: r.spec.merge(p)(tokens)[0])(r.params))
    splash_spec = restore(w, mesh, attention="splash").spec
    as_splash = np.asarray(jax.jit(lambda p: splash_spec.merge(p)(tokens)[0])(r.params))
    assert np.abs(as_xla).max() > 0.1 and float(np.abs(as_xla - as_splash).max()) <= LOGIT_TOL
    summary = stage1.run(tiny_config(**{**over, "train__steps": 4}), w)  # resumes on xla
    assert ckpt_lib.load_meta(w)["step"] == 4, summary
