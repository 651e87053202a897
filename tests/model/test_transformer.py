"""Model tests: parity with Hugging Face PyTorch models, KV-cache decoding, padding, sharding names, config checks."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import decode_in_pieces
from pal_jax.weights import hf as convert
from pal_jax.model.transformer import ModelConfig, Transformer, dense
from pal_jax.model.spec import ModelSpec

VOCAB = 97
TOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Tiny random HF checkpoints (built once per module)


def _randomize_norms(model, torch):
    """HF initialises norm weights to 1 and biases to 0; make them random so the test sees them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("ln" in name or "norm" in name) and p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch (test-only, CPU wheel) is needed for the HF parity tests")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=50000.0, tie_word_embeddings=False, max_position_embeddings=64,
        initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0))
    out = {}
    for name, m in (("gpt2", gpt2), ("llama", llama)):
        _randomize_norms(m, torch)
        m.eval()
        path = tmp_path_factory.mktemp(name)
        m.save_pretrained(path, safe_serialization=True)
        out[name] = (m, path)
    return torch, out


def _hf_logits(torch, model, tokens, attention_mask=None, position_ids=None):
    kw = {}
    if attention_mask is not None:
        kw = dict(attention_mask=torch.tensor(attention_mask, dtype=torch.long),
                  position_ids=torch.tensor(position_ids, dtype=torch.long))
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True, **kw)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


@nnx.jit
def _forward(model, tokens, positions=None, key_mask=None):
    """model(tokens) jitted (eager op-by-op dispatch is several times slower on this CPU)."""
    return model(tokens, positions=positions, key_mask=key_mask)


def _random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model with numpy-random params (avoids compiling jax.random for every param shape: ~0.6 s each here)."""
    rng = np.random.RandomState(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def _tokens(b, t, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (b, t)).astype(np.int32)


def _left_padded(b=3, t=14, pads=(0, 4, 9)):
    tokens = _tokens(b, t, seed=1)
    mask = np.ones((b, t), bool)
    for i, p in enumerate(pads):
        mask[i, :p] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_parity(hf_models, family):
    torch, models = hf_models
    hf, path = models[family]
    cfg, model = convert.load_hf_dir(path, vocab_multiple=8)  # 97 -> 104 padded rows: also checks the slicing
    assert cfg.family == family and cfg.padded_vocab == 104
    if family == "llama":
        assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (4, 2, 50000.0, False)
    tokens = _tokens(2, 16)
    ref_logits, ref_hidden = _hf_logits(torch, hf, tokens)
    logits, hidden = _forward(model, jnp.asarray(tokens))
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == jnp.float32
    assert np.abs(ref_logits).max() > 1.0  # the check is not vacuous
    diff = np.abs(np.asarray(logits) - ref_logits).max()
    print(f"{family} logits max|diff| = {diff:.3g}")
    assert diff <= TOL
    assert np.abs(np.asarray(hidden) - ref_hidden).max() <= TOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_parity_left_padding(hf_models, family):
    torch, models = hf_models
    hf, path = models[family]
    _, model = convert.load_hf_dir(path)
    tokens, mask, positions = _left_padded()
    ref, _ = _hf_logits(torch, hf, tokens, attention_mask=mask, position_ids=positions)
    logits, _ = _forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()  # fully padded query rows stay finite
    diff = np.abs(logits[mask] - ref[mask]).max()
    print(f"{family} left-padded logits max|diff| = {diff:.3g}")
    assert diff <= TOL
    # the padded row's real tokens see the same logits as the same tokens unpadded
    solo, _ = _forward(model, jnp.asarray(tokens[2:, 9:]))
    assert np.abs(logits[2, 9:] - np.asarray(solo[0])).max() <= TOL


def test_load_sharded_checkpoint_and_errors(hf_models, tmp_path):
    torch, models = hf_models
    hf, path = models["llama"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _, sharded = convert.load_hf_dir(tmp_path)
    _, single = convert.load_hf_dir(path)
    tokens = jnp.asarray(_tokens(1, 8))
    np.testing.assert_array_equal(np.asarray(_forward(sharded, tokens)[0]), np.asarray(_forward(single, tokens)[0]))

    tensors = convert.read_hf_tensors(path)
    cfg = convert.model_config_from_hf(json.loads((path / "config.json").read_text()))
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.load_hf_state_dict(model, tensors)
    with pytest.raises(ValueError, match="model_type='bert'.*expected one of"):
        convert.model_config_from_hf({"model_type": "bert"})


def test_read_bfloat16_safetensors(hf_models, tmp_path):
    torch, _ = hf_models
    from safetensors.torch import save_file
    x = torch.randn(3, 5)
    save_file({"w": x.to(torch.bfloat16), "f": x}, str(tmp_path / "model.safetensors"))
    t = convert.read_hf_tensors(tmp_path)
    assert str(t["w"].dtype) == "bfloat16"
    np.testing.assert_array_equal(t["w"].astype(np.float32), x.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(t["f"], x.numpy())


# ---------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_matches_full_forward(hf_models, family):
    """Prefill a prompt, decode a 3-token chunk, then one token at a time in jit + fori_loop (traced cache_index):
    helpers.decode_in_pieces."""
    _, models = hf_models
    _, model = convert.load_hf_dir(models[family][1])
    tokens, mask, positions = _left_padded(t=12, pads=(0, 3, 5))
    full, _ = _forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    b, t = tokens.shape
    p, slots = 5, t + 3  # prompt length; spare cache slots stay masked
    key_mask = np.zeros((b, slots), bool)
    key_mask[:, :t] = mask
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, tokens, positions, key_mask):
        m = nnx.merge(graphdef, params)
        out, cache, first, prefill_cache = decode_in_pieces(m, tokens, positions, key_mask, p, slots)
        # a prefill's LM head on its last position only (decode.prefill): the same logits there, the same cache
        last, _, last_cache = m.decode(tokens[:, :p], m.init_cache(b, slots), positions=positions[:, :p],
                                       cache_index=jnp.int32(0), key_mask=key_mask, last_only=True)
        return out, cache, (first, last, prefill_cache, last_cache)

    out, cache, (first, last, prefill_cache, last_cache) = run(params, jnp.asarray(tokens), jnp.asarray(positions),
                                                 jnp.asarray(key_mask))
    assert last.shape == (b, 1, VOCAB)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(first[:, -1:]))
    for x, y in zip(jax.tree.leaves(last_cache), jax.tree.leaves(prefill_cache), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert len(cache) == model.cfg.n_layers
    kv, hd = model.cfg.n_kv_heads, model.cfg.hd
    assert cache[0]["k"].shape == (b, kv, slots, hd) and cache[0]["v"].shape == (b, kv, hd, slots)
    # nothing written past the last token
    assert not np.asarray(cache[0]["k"][:, :, t:]).any() and not np.asarray(cache[0]["v"][..., t:]).any()
    assert np.asarray(cache[0]["v"][..., :t]).any()
    assert np.abs(np.asarray(full)[mask]).max() > 1.0
    diff = np.abs(np.asarray(out)[mask] - np.asarray(full)[mask]).max()
    print(f"{family} kv-cache vs full forward max|diff| = {diff:.3g}")
    assert diff <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Padding, sharding names, remat, config validation (no torch needed)


def test_vocab_multiple_pads_rows_and_slices_logits():
    for family, tie in (("llama", True), ("llama", False), ("gpt2", True)):
        cfg = ModelConfig(family=family, vocab_size=50, vocab_multiple=16, d_model=16, n_layers=1, n_heads=2,
                          n_kv_heads=2, d_ff=32, max_len=16, tie_embeddings=tie)
        model = _random_model(cfg)
        assert model.embed.shape == (64, 16)
        if not tie:
            assert model.head.shape == (16, 64)
        logits, hidden = _forward(model, jnp.zeros((2, 5), jnp.int32))
        assert logits.shape == (2, 5, 50) and hidden.shape == (2, 5, 16)
        assert nnx.jit(lambda m, h: m.logits(h))(model, hidden[:, -1]).shape == (2, 50)


def test_partition_specs_carry_logical_names():
    P = jax.sharding.PartitionSpec
    for family in ("llama", "gpt2"):
        cfg = ModelConfig(family=family, vocab_size=64, d_model=16, n_layers=1, n_heads=2,
                          n_kv_heads=1 if family == "llama" else 2, d_ff=32, max_len=16,
                          tie_embeddings=family == "gpt2")
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # no mesh active
        specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
        blk = specs["blocks"][0]
        assert specs["embed"] == P("vocab", "embed")
        assert specs["final_norm"]["scale"] == P("norm")
        assert blk["attn"]["q"] == P("embed", "heads", "head_dim")
        assert blk["attn"]["k"] == blk["attn"]["v"] == P("embed", "kv_heads", "head_dim")
        assert blk["attn"]["o"] == P("heads", "head_dim", "embed")
        if family == "llama":
            assert specs["head"] == P("embed", "vocab")
            assert blk["mlp"]["gate"] == blk["mlp"]["up"] == P("embed", "mlp")
            assert blk["mlp"]["down"] == P("mlp", "embed")
        else:
            assert specs["pos_embed"] == P("pos", "embed")
            assert blk["attn"]["q_bias"] == P("heads", "head_dim")
            assert blk["attn"]["k_bias"] == P("kv_heads", "head_dim")
            assert blk["attn"]["o_bias"] == blk["mlp"]["proj_bias"] == P("norm")
            assert blk["mlp"]["fc"] == P("embed", "mlp") and blk["mlp"]["fc_bias"] == P("mlp")
        leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
        assert leaves and all(len(s) > 0 for s in leaves)  # every param is annotated
        rules = (("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                 ("mlp", "tensor"), ("head_dim", None), ("norm", None), ("pos", None))
        with nnx.logical_axis_rules(rules):
            mapped = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
        assert mapped["embed"] == P("tensor", "fsdp")
        assert mapped["blocks"][0]["attn"]["o"] == P("tensor", None, "fsdp")


@pytest.mark.parametrize("x_shape,w_shape,n_in", [((3, 5, 8), (8, 6), 1), ((3, 5, 8), (8, 2, 3), 1),
                                                   ((3, 5, 2, 4), (2, 4, 7), 2), ((4, 8), (8, 6), 1)])
def test_dense_is_tensordot_in_values_and_gradients(x_shape, w_shape, n_in):
    """transformer.dense (the projections and the LM head as one 2-D matmul) computes jnp.tensordot's values and
    gradients, for every layout the model uses it in: [B,T,d] x [d,f], q/k/v [d,h,hd], o [h,hd,d], 2-D."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    y = dense(x, w, n_in)
    assert y.shape == x_shape[:len(x_shape) - n_in] + w_shape[n_in:]
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.tensordot(x, w, axes=n_in)), rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    grads = [jax.grad(lambda a, b: jnp.sum(f(a, b) * cot), argnums=(0, 1))(x, w)
             for f in (lambda a, b: dense(a, b, n_in), lambda a, b: jnp.tensordot(a, b, axes=n_in))]
    for got, want in zip(*grads):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    bf = dense(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), n_in, preferred_element_type=jnp.float32)
    assert bf.dtype == jnp.float32


def test_remat_and_bfloat16_forward():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_len=16)
    model = _random_model(cfg, seed=3)
    tokens = jnp.asarray(_tokens(2, 6) % 64)

    def loss(m):
        return m(tokens)[0].mean()

    grad = nnx.jit(nnx.grad(loss))
    g1 = grad(model)
    remat = _random_model(ModelConfig.from_dict({**cfg.to_dict(), "remat": True}), seed=3)
    g2 = grad(remat)
    for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g2))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    bf = _random_model(ModelConfig.from_dict({**cfg.to_dict(), "dtype": "bfloat16"}), seed=3)
    logits, hidden = _forward(bf, tokens)
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    ref = np.asarray(_forward(model, tokens)[0])
    assert np.abs(np.asarray(logits) - ref).max() < 0.05 * np.abs(ref).max()


def test_model_config_validation():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_layer'\].*expected keys from.*n_layers"):
        ModelConfig.from_dict({"n_layer": 2})
    assert ModelConfig.from_dict({"rope_theta": 100000}).rope_theta == 100000.0
    with pytest.raises(ValueError, match=r"ModelConfig\.n_kv_heads = 3: expected a divisor of n_heads=4"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"ModelConfig\.n_heads = 3: expected a divisor of d_model=128"):
        ModelConfig(n_heads=3, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"ModelConfig\.n_kv_heads = 2: expected n_kv_heads == n_heads=4"):
        ModelConfig(family="gpt2", n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"ModelConfig\.family = 'bert': expected one of \('llama', 'gpt2'\)"):
        ModelConfig(family="bert")
    with pytest.raises(ValueError, match=r"ModelConfig\.dtype = 'fp8'"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ValueError, match=r"ModelConfig\.vocab_size = 0: expected a positive integer"):
        ModelConfig(vocab_size=0)


def test_model_config_from_hf_fields():
    llama = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
             "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True}
    cfg = convert.model_config_from_hf(llama, vocab_multiple=128)
    assert (cfg.family, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.d_ff) == ("llama", 576, 9, 3, 64, 1536)
    assert (cfg.rope_theta, cfg.tie_embeddings, cfg.padded_vocab) == (100000.0, True, 49152)
    with pytest.raises(ValueError, match="rope_scaling: key 'low_freq_factor' missing"):
        convert.model_config_from_hf({**llama, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="rope_parameters rope_type='longrope' is not supported"):
        convert.model_config_from_hf({**llama, "rope_parameters": {"rope_type": "longrope", "factor": 8.0}})
    gpt2 = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
            "n_positions": 1024, "n_inner": None}
    cfg = convert.model_config_from_hf(gpt2)
    assert (cfg.family, cfg.d_ff, cfg.max_len, cfg.n_kv_heads, cfg.tie_embeddings) == ("gpt2", 3072, 1024, 12, True)
    with pytest.raises(ValueError, match="key 'n_embd' missing"):
        convert.model_config_from_hf({k: v for k, v in gpt2.items() if k != "n_embd"})


def test_init_from_hf_dir_into_a_sharded_run(hf_models):
    """init_from.load puts an HF dir's weights into the run's own (sharded, vocab-padded) model shape, and
    refuses a config whose architecture differs from the file's."""
    from pal_jax.core import mesh as mesh_lib
    from pal_jax.weights import init_from
    torch, models = hf_models
    hf, path = models["llama"]
    cfg = ModelConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_len=64, rope_theta=50000.0, norm_eps=1e-5, tie_embeddings=False, vocab_multiple=8)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    rules = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
             ("kv_heads", "tensor"), ("mlp", "tensor"), ("head_dim", None), ("norm", None))
    ms = ModelSpec(cfg, mesh, rules)
    assert init_from.kind(str(path)) == "hf" and init_from.kind("") == "none"
    params = init_from.load(str(path), ms)
    assert jax.tree.structure(params) == jax.tree.structure(ms.abstract)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12)).astype(np.int32)
    logits, _ = _forward(ms.merge(params), jnp.asarray(tokens))
    ref, _ = _hf_logits(torch, hf, tokens)
    assert np.max(np.abs(np.asarray(logits)[..., :VOCAB] - ref)) < TOL
    wrong = ModelSpec(dataclasses.replace(cfg, n_layers=2), mesh, rules)
    with pytest.raises(ValueError, match=r"n_layers: file 3 vs config 2"):
        init_from.load(str(path), wrong)
    with pytest.raises(FileNotFoundError, match="expected a pal_jax workdir"):
        init_from.kind(str(path) + "-missing")


@pytest.mark.parametrize("std", [0.02, 0.09])
def test_init_std_sets_the_random_init_scale(std):
    """model.init_std: every weight matrix is N(0, std), residual-output projections N(0, std / sqrt(2 L))."""
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, init_std=std)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    blk = m.blocks[0]
    for w in (m.embed, blk.attn.q, blk.mlp.up):
        assert abs(float(jnp.std(w[...])) - std) < 0.08 * std
    for w in (blk.attn.o, blk.mlp.down):
        assert abs(float(jnp.std(w[...])) - std / np.sqrt(4)) < 0.08 * std
    with pytest.raises(ValueError, match=r"ModelConfig\.init_std = 0.0: expected a positive number"):
        ModelConfig(init_std=0.0)
