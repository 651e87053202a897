"""HF import/export: round trips through transformers' PyTorch models, sharded import, refusals, the export mode."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import hf_logits, jitted_logits, tiny_config
from pal_jax.weights import hf as convert
from pal_jax.model.transformer import ModelConfig, Transformer
from pal_jax.model.spec import ModelSpec, model_config

VOCAB = 97
TOL = 1e-4

# Round-trip cases: llama with GQA, an untied head and head_dim != d_model / n_heads; gpt2 tied with d_ff != 4 d;
# and the other head choice of each family. vocab 97 padded to 104 rows (vocab_multiple 8) in every case.
CASES = {
    "llama_gqa_untied": dict(family="llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=64,
                             max_len=64, rope_theta=50000.0, norm_eps=1e-5, tie_embeddings=False),
    "gpt2_tied": dict(family="gpt2", d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96, max_len=64,
                      norm_eps=1e-5, tie_embeddings=True),
    "llama_tied": dict(family="llama", d_model=32, n_layers=1, n_heads=4, n_kv_heads=1, d_ff=48, max_len=32,
                       rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=True),
    "gpt2_untied": dict(family="gpt2", d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=32,
                        norm_eps=1e-5, tie_embeddings=False),
    # the llama variants, written as the HF family that holds their flags (pal_jax/weights/families.py)
    "qwen2": dict(family="llama", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, max_len=32,
                  rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
    "qwen3_bias": dict(family="llama", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=48,
                       max_len=32, norm_eps=1e-6, tie_embeddings=False, qkv_bias=True, o_bias=True, qk_norm=True),
    "llama3_rope_biases": dict(family="llama", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=48, max_len=32,
                               rope_theta=500000.0, tie_embeddings=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                               rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                               rope_high_freq_factor=4.0, rope_original_max_len=8),
}



def _random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Numpy-random params (std 0.3, padded vocab rows included: the export must cut them off)."""
    rng = np.random.RandomState(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)



def _params(model) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}


def _assert_same_params(original, imported, vocab):
    """Identical params; the padded vocab rows (cut by the export) come back as zeros."""
    a, b = _params(original), _params(imported)
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert x.shape == y.shape, k
        if k == "['embed']":
            x, pad = x[:vocab], y[vocab:]
            y = y[:vocab]
        elif k == "['head']":
            x, pad = x[:, :vocab], y[:, vocab:]
            y = y[:, :vocab]
        else:
            pad = np.zeros(0)
        np.testing.assert_array_equal(x, y, err_msg=k)
        assert not pad.any(), k


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trip(hf, tmp_path, case):
    torch, transformers = hf
    cfg = ModelConfig(vocab_size=VOCAB, vocab_multiple=8, **CASES[case])
    assert cfg.padded_vocab == 104
    model = _random_model(cfg, seed=len(case))
    out = convert.export_hf_dir(model, cfg, tmp_path / "hf")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n != "hf"]  # no temporary dir left beside it

    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == {"qwen2": "qwen2", "qwen3_bias": "qwen3"}.get(case, cfg.family)
    assert hf_cfg["vocab_size"] == VOCAB
    assert hf_cfg["torch_dtype"] == "float32" and hf_cfg["tie_word_embeddings"] == cfg.tie_embeddings
    tensors = convert.read_hf_tensors(out)
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_model.eval()
    expected_cls = {"gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM", "qwen3_bias": "Qwen3ForCausalLM"}.get(
        case.split("_")[0] if case.startswith("gpt2") else case, "LlamaForCausalLM")
    assert type(hf_model).__name__ == expected_cls and hf_model.dtype == torch.float32
    assert hf_model.config.vocab_size == VOCAB and hf_model.config.tie_word_embeddings == cfg.tie_embeddings
    if cfg.family == "llama":
        c = hf_model.config
        assert (c.num_key_value_heads, c.head_dim, c.rms_norm_eps) == (cfg.n_kv_heads, cfg.hd, cfg.norm_eps)
        assert c.rope_parameters["rope_theta"] == cfg.rope_theta
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 16)).astype(np.int32)
    tokens[0, :3] = VOCAB - 1  # the last real vocab row
    ref = hf_logits(torch, hf_model, tokens)
    got = np.asarray(jitted_logits(model, jnp.asarray(tokens)))
    assert got.shape == ref.shape == (2, 16, VOCAB)
    assert np.abs(ref).max() > 1.0  # not vacuous
    diff = float(np.abs(got - ref).max())
    print(f"{case}: pal_jax vs transformers logits max|diff| = {diff:.3g}")
    assert diff <= TOL

    cfg2, imported = convert.load_hf_dir(out, vocab_multiple=8)
    assert cfg2 == cfg
    _assert_same_params(model, imported, VOCAB)

    # exporting again replaces the earlier export (and nothing is left beside it)
    convert.export_hf_dir(imported, None, out)
    assert convert.read_hf_tensors(out).keys() == tensors.keys()
    assert not [n for n in os.listdir(tmp_path) if n != "hf"]


def test_sharded_import_both_families(hf, tmp_path):
    """save_pretrained with a small max_shard_size writes model.safetensors.index.json + shards; import reads them."""
    torch, transformers = hf
    for case in ("llama_gqa_untied", "gpt2_tied"):
        cfg = ModelConfig(vocab_size=VOCAB, **CASES[case])
        model = _random_model(cfg, seed=5)
        single = convert.export_hf_dir(model, cfg, tmp_path / case)
        sharded = tmp_path / f"{case}_sharded"
        transformers.AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="20KB")
        shards = sorted(n for n in os.listdir(sharded) if n.endswith(".safetensors"))
        assert (sharded / "model.safetensors.index.json").exists() and len(shards) > 1, shards
        assert not (sharded / "model.safetensors").exists()
        cfg2, imported = convert.load_hf_dir(sharded)
        assert cfg2 == cfg
        _assert_same_params(model, imported, VOCAB)


def _tiny_export(tmp_path, name="hf", **kw):
    cfg = ModelConfig(vocab_size=VOCAB, **{**CASES["gpt2_untied"], **kw})
    return cfg, convert.export_hf_dir(_random_model(cfg), cfg, tmp_path / name)


def test_import_refusals_name_the_problem(tmp_path):
    cfg, out = _tiny_export(tmp_path)
    # a missing tensor: named
    from safetensors.numpy import save_file
    tensors = convert.read_hf_tensors(out)
    del tensors["transformer.h.0.mlp.c_fc.bias"]
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'transformer\.h\.0\.mlp\.c_fc\.bias' not found"):
        convert.load_hf_dir(out)
    # an unsupported architecture: named, with its architectures; remote code is never run
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError, match=r"model_type='bert' \(architectures=\['BertForMaskedLM'\]\) is not "
                                         r"supported; expected one of \('gpt2', 'llama', 'qwen2', 'qwen3', 'mistral'\)"):
        convert.load_hf_dir(bert)
    custom = {"model_type": "my_llm", "architectures": ["MyLLM"], "auto_map": {"AutoModelForCausalLM": "m.MyLLM"}}
    (bert / "config.json").write_text(json.dumps(custom))
    with pytest.raises(ValueError, match="model_type='my_llm'.*remote code is never run"):
        convert.load_hf_dir(bert)
    # a pickle-only directory: refused without reading the file (its bytes are not even a pickle)
    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    (pt / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"\['pytorch_model\.bin'\] but no safetensors.*convert it first"):
        convert.load_hf_dir(pt)
    # a sharded index whose shard is missing: the shard is named
    (pt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"shard 'model-00001-of-00002\.safetensors' is listed"):
        convert.load_hf_dir(pt)


def test_export_refuses_to_replace_other_dirs_and_bad_params(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, **CASES["gpt2_untied"])
    model = _random_model(cfg)
    workdir = tmp_path / "work"
    (workdir / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"holds \['checkpoints'\], which an export does not write"):
        convert.export_hf_dir(model, cfg, workdir)
    assert os.listdir(workdir) == ["checkpoints"]
    other = ModelConfig(vocab_size=VOCAB, **{**CASES["gpt2_untied"], "d_ff": 32})
    with pytest.raises(ValueError, match=r"param blocks/0/mlp/fc has shape \(16, 64\); expected \(16, 32\)"):
        convert.export_hf_dir(model, other, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # params as a pure dict (as restored from a checkpoint) export the same tensors as the module
    a = convert.hf_state_dict(model, cfg)
    b = convert.hf_state_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# A trained checkpoint: export_checkpoint and the export mode


@pytest.fixture(scope="module")
def stage1_workdir(tmp_path_factory):
    from pal_jax.training import stage1
    # vocab_multiple 128: the trained tokenizer's ~400 tokens are padded, so the export's cut is exercised
    c = tiny_config(train__steps=4, train__checkpoint_every=4, train__eval_every=4, train__log_every=2,
                    model__vocab_multiple=128)
    workdir = str(tmp_path_factory.mktemp("s1"))
    stage1.run(c, workdir, devices=jax.devices()[:1])
    return workdir


def test_export_checkpoint_matches_pal_jax(hf, stage1_workdir, tmp_path):
    torch, transformers = hf
    from pal_jax.core import checkpoint as ckpt_lib
    from pal_jax.core import mesh as mesh_lib
    from pal_jax.model import tokenizer as tok_lib
    from pal_jax.weights import export
    summary = export.export_checkpoint(stage1_workdir, tmp_path / "hf")
    out = summary["output_dir"]
    assert summary["step"] == 4 and summary["family"] == "llama"
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(os.listdir(out))

    # pal_jax side, rebuilt as the predictor does (saved model config, workdir tokenizer, params onto a mesh)
    tok = tok_lib.load_tokenizer(os.path.join(stage1_workdir, "tokenizer"))
    saved = ckpt_lib.load_meta(stage1_workdir)["config"]
    c = tiny_config()
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    ms = ModelSpec(model_config(saved["model"], tok.vocab_size), mesh, mesh_lib.axis_rules(c))
    assert ms.cfg.padded_vocab > ms.cfg.vocab_size == tok.vocab_size == summary["vocab_size"]
    params, _ = ckpt_lib.load_params(stage1_workdir, ms.abstract)

    text = "i love my dog . what do you do for fun ?"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eos_id, tok.pad_id)
    tokens = np.asarray([ids + [tok.eos_id], list(range(tok.vocab_size - len(ids) - 1, tok.vocab_size))], np.int32)
    got = np.asarray(jitted_logits(ms.merge(params), jnp.asarray(tokens)))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_model.eval()
    ref = hf_logits(torch, hf_model, tokens)
    assert got.shape == ref.shape == (2, len(ids) + 1, tok.vocab_size)
    diff = float(np.abs(got - ref).max())
    print(f"stage-1 checkpoint: pal_jax vs transformers logits max|diff| = {diff:.3g}")
    assert diff <= TOL
    assert hf_model.config.eos_token_id == tok.eos_id


def test_export_mode_writes_workdir_hf(stage1_workdir):
    from configs import export
    from pal_jax import main
    from pal_jax.config import validate
    config = export.get_config("tiny")
    assert config.mode == "export" and config.export.output_dir == ""
    validate(config)
    summary = main.dispatch(config, stage1_workdir)
    out = os.path.join(stage1_workdir, "hf")
    assert summary["output_dir"] == out and summary["step"] == 4
    cfg, model = convert.load_hf_dir(out)
    assert cfg.family == "llama" and cfg.vocab_size == summary["vocab_size"]
    # the workdir's own files are untouched beside the export
    assert {"checkpoints", "tokenizer", "hf"} <= set(os.listdir(stage1_workdir))
