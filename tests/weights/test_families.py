"""HF families beyond plain Llama and GPT-2 (Qwen2, Qwen3, Llama biases, RoPE scaling) and the loads that must never
be silently wrong: tiny random transformers models saved in the test, logits compared both ways (import, and
transformers reloading our export)."""
from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import hf_logits, jitted_logits
from pal_jax.weights import hf as convert
from pal_jax.inference import decode as sampling
from pal_jax.inference import scoring
from pal_jax.model.transformer import ModelConfig, Transformer

VOCAB = 97
TOL = 1e-4
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-5,
             tie_word_embeddings=False)




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
    ref = hf_logits(torch, ref_model, tokens)
    assert np.abs(ref).max() > 1.0  # not vacuous
    cfg, model = convert.load_hf_dir(tmp_path / "src")
    d_import = float(np.abs(np.asarray(jitted_logits(model, jnp.asarray(tokens))) - ref).max())
    out = convert.export_hf_dir(model, cfg, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    back.eval()
    assert type(back).__name__ == (arch or type(ref_model).__name__)
    d_export = float(np.abs(hf_logits(torch, back, tokens) - ref).max())
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
    ref = hf_logits(torch, ref_model, tokens)
    with caplog.at_level(logging.WARNING):
        cfg, model = convert.load_hf_dir(path)
    assert "rope_scaling" in caplog.text and "rope_parameters" in caplog.text and "disagree" in caplog.text
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 4.0, 500.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a disagreement on theta alone is named too
        convert.model_config_from_hf({**hf_cfg, "rope_scaling": {"rope_type": "default"}})
    assert "disagree" in caplog.text
    diff = float(np.abs(np.asarray(jitted_logits(model, jnp.asarray(tokens))) - ref).max())
    print(f"rope_scaling + rope_parameters: max|diff| = {diff:.3g}")
    assert diff <= TOL
    # the other reading is far off: the test tells them apart
    hf_cfg.pop("rope_scaling")
    (path / "config.json").write_text(json.dumps(hf_cfg))
    _, other = convert.load_hf_dir(path)
    assert float(np.abs(np.asarray(jitted_logits(other, jnp.asarray(tokens))) - ref).max()) > 0.5


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
        jax.eval_shape(lambda: scoring.score_candidates(model, tokens, mask, cand, cmask))


# ---------------------------------------------------------------------------------------------------------------
# Families: import and export parity

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
FAMILY_CASES = {
    # name: (config class, kwargs, sequence length, exported architecture when it differs)
    "qwen2": ("Qwen2Config", dict(SMALL), 24, None),
    "qwen2_tied": ("Qwen2Config", dict(SMALL, tie_word_embeddings=True, num_key_value_heads=1), 24, None),
    "llama_attention_bias": ("LlamaConfig", dict(SMALL, attention_bias=True), 24, None),
    "llama_mlp_bias": ("LlamaConfig", dict(SMALL, mlp_bias=True), 24, None),
    "llama_both_biases": ("LlamaConfig", dict(SMALL, attention_bias=True, mlp_bias=True), 24, None),
    # RoPE scaling, on 48 tokens: longer than original_max_position_embeddings=32; wavelengths fall in all three
    # llama3 bands (head_dim 16: 6.3 < 8 = 32/4, 19.9 between, 62.8.. > 32 = 32/1)
    "llama3_rope_parameters": ("LlamaConfig", dict(SMALL, head_dim=16, rope_parameters=dict(
        LLAMA3_ROPE, rope_theta=10000.0)), 48, None),
    "linear_rope_parameters": ("LlamaConfig", dict(SMALL, rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}), 48, None),
    "yarn_rope_parameters": ("LlamaConfig", dict(SMALL, head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}), 48, None),
    "qwen2_yarn_options": ("Qwen2Config", dict(SMALL, head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 24, "rope_theta": 20000.0,
        "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False, "mscale": 2.0, "mscale_all_dim": 1.0}), 48, None),
    "qwen3": ("Qwen3Config", dict(SMALL), 24, None),
    "qwen3_attention_bias": ("Qwen3Config", dict(SMALL, attention_bias=True, head_dim=8), 24, None),
    "mistral_no_window": ("MistralConfig", dict(SMALL, sliding_window=None), 24, "LlamaForCausalLM"),
    "mistral_window": ("MistralConfig", dict(SMALL, sliding_window=6), 24, None),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_parity_import_and_export(hf, tmp_path, case):
    torch, transformers = hf
    cls, kw, t, arch = FAMILY_CASES[case]
    d_import, d_export, cfg = _round_trip(hf, tmp_path, getattr(transformers, cls)(**kw), t=t, arch=arch)
    print(f"{case}: max|diff| import {d_import:.3g}, export {d_export:.3g}")
    assert d_import <= TOL and d_export <= TOL
    if "rope" in case:
        assert cfg.rope_type == kw["rope_parameters"]["rope_type"]


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"type": "linear", "factor": 4.0},
                                  {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_transformers4_rope_scaling_form(hf, tmp_path, rope):
    """A transformers-4 config.json (rope_theta at the top, rope_scaling, no rope_parameters; linear with the legacy
    "type" key) reads as transformers 5 reads it."""
    torch, transformers = hf
    _, path = _llama_dir(hf, tmp_path, head_dim=16)
    hf_cfg = json.loads((path / "config.json").read_text())
    hf_cfg.pop("rope_parameters", None)
    hf_cfg.update(rope_theta=20000.0, rope_scaling=rope)
    (path / "config.json").write_text(json.dumps(hf_cfg))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    ref_model.eval()
    tokens = _tokens(48)
    ref = hf_logits(torch, ref_model, tokens)
    cfg, model = convert.load_hf_dir(path)
    assert (cfg.rope_type, cfg.rope_theta) == (rope.get("rope_type", rope.get("type")), 20000.0)
    diff = float(np.abs(np.asarray(jitted_logits(model, jnp.asarray(tokens))) - ref).max())
    print(f"transformers-4 form {cfg.rope_type}: max|diff| = {diff:.3g}")
    assert diff <= TOL
    # without the scaling the logits past the original context differ: the scaling is applied, not ignored
    plain = ModelConfig.from_dict({**cfg.to_dict(), "rope_type": "default"})
    _, state = nnx.split(model)
    other = nnx.merge(nnx.graphdef(Transformer(plain, rngs=nnx.Rngs(0))), state)
    assert float(np.abs(np.asarray(jitted_logits(other, jnp.asarray(tokens))) - ref).max()) > 0.1


def test_family_refusals(hf, tmp_path):
    torch, transformers = hf
    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
            "intermediate_size": 64}
    cfg = convert.model_config_from_hf({"model_type": "mistral", **base, "num_key_value_heads": 2})
    assert cfg.sliding_window == 4096  # absent = MistralConfig's default, as transformers reads it
    with pytest.raises(ValueError, match=r"model_type='qwen2'.*use_sliding_window=True with sliding_window=16 is "
                                         r"not supported.*expected use_sliding_window=False"):
        convert.model_config_from_hf({"model_type": "qwen2", **base, "use_sliding_window": True,
                                      "sliding_window": 16})
    with pytest.raises(ValueError, match=r"model_type='qwen3'.*layer_types holds \['sliding_attention'\]; "
                                         r"expected only 'full_attention'"):
        convert.model_config_from_hf({"model_type": "qwen3", **base, "num_key_value_heads": 2,
                                      "layer_types": ["sliding_attention"]})
    with pytest.raises(ValueError, match=r"model_type='qwen2'.*attention_bias=True; expected False"):
        convert.model_config_from_hf({"model_type": "qwen2", **base, "attention_bias": True})
    cfg = convert.model_config_from_hf({"model_type": "qwen3", **base, "num_key_value_heads": 2})
    assert (cfg.hd, cfg.qk_norm, cfg.qkv_bias) == (128, True, False)  # Qwen3Config's head_dim default
    # a flag combination no HF family holds is refused at export, naming the flags
    odd = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, qkv_bias=True,
                      mlp_bias=True)
    with pytest.raises(ValueError, match=r"no Hugging Face family holds a llama model with \{'qkv_bias': True, "
                                         r"'o_bias': False, 'mlp_bias': True"):
        convert.export_hf_dir({}, odd, tmp_path / "odd")  # refused before any param is read
    assert not (tmp_path / "odd").exists()


def _random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    rng = np.random.RandomState(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)[0]


def test_sliding_window_in_cached_decoding_and_candidate_scoring():
    """The banded mask holds in the KV-cache paths too: greedy decoding and candidate scoring (left-padded prompts,
    the cache longer than the window) give what full forward passes over the real tokens give."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64,
                      sliding_window=4, tie_embeddings=False)
    model = _random_model(cfg, seed=3)
    graphdef, params = nnx.split(model)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(2, VOCAB, 10).tolist(), rng.randint(2, VOCAB, 7).tolist()]  # the second left-padded
    tokens, mask = sampling.left_pad(prompts, 10, 0)

    def full(seq):  # right-padded to one length (one compile): causal, so the padding changes no earlier logit
        return np.asarray(_logits(graphdef, params, jnp.asarray([seq + [0] * (16 - len(seq))], jnp.int32))
                          )[0, :len(seq)]

    greedy = sampling.SamplingConfig(method="greedy", max_new_tokens=6)
    out = np.asarray(sampling.generate_jit(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask),
                                           jax.random.key(0), cfg=greedy, eos_id=-1, pad_id=0))
    for row, prompt in zip(out, prompts):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(np.argmax(full(seq)[-1])))
        assert row.tolist() == seq[len(prompt):]

    cands = rng.randint(2, VOCAB, (2, 3, 5)).astype(np.int32)
    cmask = np.ones((2, 3, 5), bool)
    cmask[1, 2, 3:] = False  # a shorter candidate
    lp = np.asarray(scoring.candidate_token_logprobs_jit(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask),
                                                          jnp.asarray(cands), jnp.asarray(cmask)))
    worst = 0.0
    for b, prompt in enumerate(prompts):
        for k in range(3):
            n = int(cmask[b, k].sum())
            seq = prompt + cands[b, k, :n].tolist()
            z = full(seq)[len(prompt) - 1:-1].astype(np.float64)
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            ref = logp[np.arange(n), cands[b, k, :n]]
            worst = max(worst, float(np.abs(lp[b, k, :n] - ref).max()))
    print(f"sliding window candidate scoring vs full forward: max|diff| = {worst:.3g}")
    assert worst <= TOL
    # the window matters at these lengths: without it the full-forward logits differ
    plain = ModelConfig.from_dict({**cfg.to_dict(), "sliding_window": 0})
    unbanded = nnx.graphdef(nnx.eval_shape(lambda: Transformer(plain, rngs=nnx.Rngs(0))))
    seq = jnp.asarray([prompts[0] + [0] * 6], jnp.int32)
    assert float(np.abs(np.asarray(_logits(unbanded, params, seq)) - full(prompts[0] + [0] * 6)).max()) > 0.1


@pytest.mark.parametrize("preset,n_params", [
    ("qwen2_5_0_5b", 494_032_768), ("qwen2_5_1_5b", 1_543_714_304), ("llama3_2_1b", 1_235_814_400),
    ("qwen3_0_6b", 596_049_920), ("mistral_7b", 7_248_023_552), ("llama3_1_8b", 8_030_261_248),
    ("llama3_8b", 8_030_261_248)])
def test_real_checkpoint_presets_have_their_shapes(hf, preset, n_params):
    """The presets build (abstract shapes, no weights) with the checkpoints' published parameter counts, and the
    Llama-3.2 preset's RoPE frequencies are transformers' for that checkpoint's rope_scaling."""
    from configs import common
    from pal_jax.model.transformer import rope_inv_freq
    cfg = ModelConfig.from_dict({**common.MODEL_VARIANT_DEFAULTS, **common.MODEL_PRESETS[preset]})
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) == n_params
    if preset == "llama3_2_1b":
        torch, transformers = hf
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        hf_cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
        np.testing.assert_allclose(rope_inv_freq(cfg), ref.numpy(), rtol=1e-6)


def test_resume_reads_a_checkpoint_saved_before_the_variant_keys():
    """A workdir written before qkv_bias, rope_type, sliding_window ... existed resumes: a missing model key reads
    as ModelConfig's default; a set one that differs is still named."""
    from helpers import tiny_config
    from pal_jax.training import loop as train
    task = train.Task(name="stage1", loss_fn=None, train_batch=None, eval_batches=None)
    now = json.loads(tiny_config().to_json_best_effort())
    assert now["model"]["qkv_bias"] is False and now["model"]["sliding_window"] == 0
    old = {**now, "model": {k: v for k, v in now["model"].items() if k not in ("qkv_bias", "rope_type",
                                                                              "sliding_window")}}
    train._check_resume({"config": old}, now, task, "W")
    biased = {**now, "model": {**now["model"], "qkv_bias": True}}
    with pytest.raises(ValueError, match=r"config\.model\.qkv_bias: checkpoint has False, now True"):
        train._check_resume({"config": old}, biased, task, "W")
