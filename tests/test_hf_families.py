"""HF families beyond plain Llama and GPT-2 (Qwen2, Qwen3, Llama biases, RoPE scaling) and the loads that must never
be silently wrong: tiny random transformers models saved in the test, logits compared both ways (import, and
transformers reloading our export)."""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pal_jax import convert, sampling
from pal_jax.model import ModelConfig, Transformer

VOCAB = 97
TOL = 1e-4
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-5,
             tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch", reason="torch (test-only, CPU wheel) is needed for the HF parity tests")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers


@nnx.jit
def _forward(model, tokens):
    return model(tokens)[0]


def _hf_logits(torch, model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _save_random(torch, transformers, config, path, seed=0):
    """A transformers model for `config`, every param redrawn (std 0.2; norm scales around 1) so that biases, norms
    and RoPE all move the logits; saved as safetensors into `path`."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    return model


def _tokens(t=24, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (2, t)).astype(np.int32)


def _round_trip(hf, tmp_path, config, *, t=24, arch=None):
    """-> (import max|diff|, export max|diff|, our ModelConfig). Import: our logits vs transformers' on the saved
    dir. Export: transformers reloads our export of the imported model; its logits vs the original's."""
    torch, transformers = hf
    ref_model = _save_random(torch, transformers, config, tmp_path / "src")
    tokens = _tokens(t)
    ref = _hf_logits(torch, ref_model, tokens)
    assert np.abs(ref).max() > 1.0  # not vacuous
    cfg, model = convert.load_hf_dir(tmp_path / "src")
    d_import = float(np.abs(np.asarray(_forward(model, jnp.asarray(tokens))) - ref).max())
    out = convert.export_hf_dir(model, cfg, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    back.eval()
    assert type(back).__name__ == (arch or type(ref_model).__name__)
    d_export = float(np.abs(_hf_logits(torch, back, tokens) - ref).max())
    cfg2, _ = convert.load_hf_dir(out)
    assert cfg2 == cfg
    return d_import, d_export, cfg


# ---------------------------------------------------------------------------------------------------------------
# No silent wrong load


def _llama_dir(hf, tmp_path, name="src", **kw):
    torch, transformers = hf
    config = transformers.LlamaConfig(**{**SMALL, **kw})
    return _save_random(torch, transformers, config, tmp_path / name), tmp_path / name


def test_rope_scaling_and_rope_parameters_disagree_follow_transformers(hf, tmp_path, caplog):
    """Both keys in config.json, disagreeing: transformers 5 follows rope_scaling; so does the import (with a
    warning naming both keys), to its logits."""
    torch, transformers = hf
    _, path = _llama_dir(hf, tmp_path)
    hf_cfg = json.loads((path / "config.json").read_text())
    hf_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    hf_cfg["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    hf_cfg["rope_theta"] = 500.0
    (path / "config.json").write_text(json.dumps(hf_cfg))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    ref_model.eval()
    assert ref_model.config.rope_parameters["rope_type"] == "linear"
    tokens = _tokens(40)
    ref = _hf_logits(torch, ref_model, tokens)
    with caplog.at_level(logging.WARNING):
        cfg, model = convert.load_hf_dir(path)
    assert "rope_scaling" in caplog.text and "rope_parameters" in caplog.text and "disagree" in caplog.text
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 4.0, 500.0)
    diff = float(np.abs(np.asarray(_forward(model, jnp.asarray(tokens))) - ref).max())
    print(f"rope_scaling + rope_parameters: max|diff| = {diff:.3g}")
    assert diff <= TOL
    # the other reading is far off: the test tells them apart
    hf_cfg.pop("rope_scaling")
    (path / "config.json").write_text(json.dumps(hf_cfg))
    _, other = convert.load_hf_dir(path)
    assert float(np.abs(np.asarray(_forward(other, jnp.asarray(tokens))) - ref).max()) > 0.5


@pytest.mark.parametrize("name,shape,message", [
    # q/k/o are non-square: a transposed copy has the right element count and used to load with wrong logits
    ("model.layers.0.self_attn.q_proj.weight", (32, 48), r"has shape \(32, 48\) \(it looks transposed\); expected "
                                                        r"\(48, 32\)"),
    ("model.layers.1.self_attn.k_proj.weight", (32, 24), r"has shape \(32, 24\) \(it looks transposed\); expected "
                                                        r"\(24, 32\)"),
    ("model.layers.0.self_attn.o_proj.weight", (48, 32), r"has shape \(48, 32\) \(it looks transposed\); expected "
                                                        r"\(32, 48\)"),
    ("model.layers.0.self_attn.q_proj.weight", (40, 32), r"has shape \(40, 32\); expected \(48, 32\)"),
    ("model.layers.1.self_attn.o_proj.weight", (32, 40), r"has shape \(32, 40\); expected \(32, 48\)"),
    ("model.embed_tokens.weight", (VOCAB, 33), rf"has shape \({VOCAB}, 33\); expected \({VOCAB}, 32\)"),
])
def test_misshapen_tensor_named_with_expected_shape(hf, tmp_path, name, shape, message):
    from safetensors.numpy import save_file
    _, path = _llama_dir(hf, tmp_path)
    tensors = convert.read_hf_tensors(path)
    w = tensors[name]
    tensors[name] = (np.ascontiguousarray(w.T) if shape == w.shape[::-1]
                     else np.zeros(shape, np.float32))
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"tensor '{name}' " + message):
        convert.load_hf_dir(path)


def test_unexpected_bias_and_truncated_file_named(hf, tmp_path):
    from safetensors.numpy import save_file
    _, path = _llama_dir(hf, tmp_path)
    tensors = convert.read_hf_tensors(path)
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(48, np.float32)},
              str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' is present but the "
                                         r"config says"):
        convert.load_hf_dir(path)
    save_file(tensors, str(path / "model.safetensors"))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path / 'model.safetensors'}: cannot read this safetensors file "
                                         rf"\({len(data) // 2} bytes\).*truncated"):
        convert.load_hf_dir(path)


def test_gpt2_longer_than_n_positions_is_refused():
    cfg = ModelConfig(family="gpt2", vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                      max_len=16)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    jax.eval_shape(lambda: model(jnp.zeros((1, 16), jnp.int32)))  # exactly n_positions: fine (traced only)
    with pytest.raises(ValueError, match=r"gpt2 model: a sequence of 17 tokens; expected at most max_len=16"):
        jax.eval_shape(lambda: model(jnp.zeros((1, 17), jnp.int32)))
    tokens, mask = jnp.zeros((1, 12), jnp.int32), jnp.ones((1, 12), bool)
    for method in ("greedy", "beam"):
        scfg = sampling.SamplingConfig(method=method, max_new_tokens=5, beam_width=2)
        with pytest.raises(ValueError, match=r"a KV cache \(prompt \+ new tokens\) of 17 tokens; expected at most "
                                             r"max_len=16"):
            jax.eval_shape(lambda: sampling.generate(model, tokens, mask, jax.random.key(0), scfg, eos_id=1,
                                                     pad_id=0))
    greedy4 = sampling.SamplingConfig(method="greedy", max_new_tokens=4)  # 12 + 4 = n_positions: fine (traced only)
    ok = jax.eval_shape(lambda: sampling.generate(model, tokens, mask, jax.random.key(0), greedy4, eos_id=1, pad_id=0))
    assert ok.shape == (1, 4)
    cand, cmask = jnp.zeros((1, 2, 5), jnp.int32), jnp.ones((1, 2, 5), bool)
    with pytest.raises(ValueError, match=r"17 tokens; expected at most max_len=16"):
        jax.eval_shape(lambda: sampling.score_candidates(model, tokens, mask, cand, cmask))
