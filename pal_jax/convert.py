"""Hugging Face checkpoints (config.json + safetensors) in and out of pal_jax models.

Supported model_type: "gpt2" (GPT2LMHeadModel) and "llama" (LlamaForCausalLM and compatible, e.g. SmolLM2).
Layouts: GPT-2 stores Conv1D weights as [in, out] with q/k/v fused in c_attn; Llama stores nn.Linear weights as
[out, in]. Both are reshaped into the model's [embed, heads, head_dim] / [heads, head_dim, embed] kernels.
No torch, no pickle and no remote code: tensors are read and written with safetensors' numpy functions, and a
directory holding only pytorch_model.bin (a pickle) is refused.

Import: `load_hf_dir(path)` (model.safetensors, or shards listed in model.safetensors.index.json).
Export: `export_hf_dir(model_or_params, cfg, out_dir, tokenizer)` writes config.json, generation_config.json,
model.safetensors (float32, the vocab cut back from the padded `vocab_multiple` rows to `vocab_size`) and the
tokenizer files, into a temporary directory renamed to `out_dir` when complete. `export_checkpoint(workdir,
out_dir)` does it for a pal_jax checkpoint (its saved model config and tokenizer; a LoRA checkpoint's adapters are
merged into its base first, W + alpha/r A B: pal_jax/lora.py); `run_export` is the `export` mode of pal_jax.main.
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads the result.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import struct
import tempfile
import uuid
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pal_jax.model import ModelConfig, Transformer

SUPPORTED = ("gpt2", "llama")
# Buffers some checkpoints carry that are not parameters (GPT-2 causal-mask buffers, cached RoPE frequencies).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise ValueError(f"{where}: key {key!r} missing from the HF config; expected it for this model_type")
    return hf[key]


def model_config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """HF config.json dict -> ModelConfig. `overrides` (e.g. dtype, vocab_multiple, max_len) replace fields."""
    mt = hf_config.get("model_type")
    where = f"HF config (model_type={mt!r})"
    if mt == "gpt2":
        act = hf_config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation_function={act!r}; expected 'gelu_new' (tanh GELU)")
        if hf_config.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError(f"{where}: scale_attn_by_inverse_layer_idx=True is not supported; expected False")
        if not hf_config.get("scale_attn_weights", True):
            raise ValueError(f"{where}: scale_attn_weights=False is not supported; expected True")
        d = _need(hf_config, "n_embd", where)
        n_heads = _need(hf_config, "n_head", where)
        fields = dict(family="gpt2", vocab_size=_need(hf_config, "vocab_size", where), d_model=d,
                      n_layers=_need(hf_config, "n_layer", where), n_heads=n_heads, n_kv_heads=n_heads,
                      d_ff=hf_config.get("n_inner") or 4 * d, max_len=_need(hf_config, "n_positions", where),
                      norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
                      tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)))
    elif mt == "llama":
        act = hf_config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act={act!r}; expected 'silu'")
        for key in ("attention_bias", "mlp_bias"):
            if hf_config.get(key, False):
                raise ValueError(f"{where}: {key}=True is not supported; expected False")
        rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{where}: rope type {rope_type!r} is not supported; expected 'default' (plain RoPE)")
        theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        d = _need(hf_config, "hidden_size", where)
        n_heads = _need(hf_config, "num_attention_heads", where)
        head_dim = hf_config.get("head_dim") or d // n_heads
        fields = dict(family="llama", vocab_size=_need(hf_config, "vocab_size", where), d_model=d,
                      n_layers=_need(hf_config, "num_hidden_layers", where), n_heads=n_heads,
                      n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
                      head_dim=0 if head_dim * n_heads == d else head_dim,
                      d_ff=_need(hf_config, "intermediate_size", where),
                      max_len=hf_config.get("max_position_embeddings", 2048), rope_theta=float(theta),
                      norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
                      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))
    else:
        arch = hf_config.get("architectures")
        remote = " (it names custom code in auto_map; remote code is never run)" if "auto_map" in hf_config else ""
        raise ValueError(f"HF config: model_type={mt!r} (architectures={arch}) is not supported{remote}; "
                         f"expected one of {SUPPORTED}")
    fields.update(overrides)
    return ModelConfig.from_dict(fields)


class _Tensors:
    """Name lookup over a checkpoint's tensors that records which ones were used."""

    def __init__(self, tensors: dict[str, np.ndarray], prefixes: tuple[str, ...]):
        self.tensors, self.prefixes, self.used = tensors, prefixes, set()

    def get(self, name: str) -> np.ndarray:
        for p in self.prefixes:
            if p + name in self.tensors:
                self.used.add(p + name)
                return np.asarray(self.tensors[p + name])
        raise ValueError(f"HF checkpoint: tensor {self.prefixes[0] + name!r} not found "
                         f"({len(self.tensors)} tensors present); expected it for this model config")

    def unused(self) -> list[str]:
        return sorted(k for k in self.tensors if k not in self.used and not k.endswith(_IGNORED_SUFFIXES))


def _assign(param: nnx.Param, value: np.ndarray, name: str, pad_rows: int = 0, pad_cols: int = 0):
    if pad_rows or pad_cols:
        value = np.pad(value, ((0, pad_rows), (0, pad_cols)))
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"HF checkpoint: tensor {name!r} has shape {tuple(value.shape)} after conversion; "
                         f"expected {tuple(param.shape)} for this model config")
    param.set_value(jnp.asarray(value.astype(np.float32), dtype=param.dtype))


def load_hf_state_dict(model: Transformer, tensors: dict[str, np.ndarray]) -> None:
    """Copy HF tensors into the model's params in place. Missing or unexpected tensors -> ValueError naming them.

    Works on a concrete model or on one from nnx.eval_shape (its abstract params become arrays)."""
    cfg = model.cfg
    pad_v = cfg.padded_vocab - cfg.vocab_size
    h, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.d_model
    if cfg.family == "gpt2":
        t = _Tensors(tensors, ("transformer.", ""))
        _assign(model.embed, t.get("wte.weight"), "wte.weight", pad_rows=pad_v)
        _assign(model.pos_embed, t.get("wpe.weight"), "wpe.weight")
        for i, blk in enumerate(model.blocks):
            p = f"h.{i}."
            _assign(blk.attn_norm.scale, t.get(p + "ln_1.weight"), p + "ln_1.weight")
            _assign(blk.attn_norm.bias, t.get(p + "ln_1.bias"), p + "ln_1.bias")
            w, b = t.get(p + "attn.c_attn.weight"), t.get(p + "attn.c_attn.bias")  # [d, 3*h*hd] (in, out)
            if w.shape != (d, 3 * h * hd):
                raise ValueError(f"HF checkpoint: tensor {p + 'attn.c_attn.weight'!r} has shape {w.shape}; "
                                 f"expected {(d, 3 * h * hd)}")
            for j, (kern, bias) in enumerate(((blk.attn.q, blk.attn.q_bias), (blk.attn.k, blk.attn.k_bias),
                                              (blk.attn.v, blk.attn.v_bias))):
                cols = slice(j * h * hd, (j + 1) * h * hd)
                _assign(kern, w[:, cols].reshape(d, h, hd), p + "attn.c_attn.weight")
                _assign(bias, b[cols].reshape(h, hd), p + "attn.c_attn.bias")
            name = p + "attn.c_proj.weight"
            _assign(blk.attn.o, t.get(name).reshape(h, hd, d), name)
            _assign(blk.attn.o_bias, t.get(p + "attn.c_proj.bias"), p + "attn.c_proj.bias")
            _assign(blk.mlp_norm.scale, t.get(p + "ln_2.weight"), p + "ln_2.weight")
            _assign(blk.mlp_norm.bias, t.get(p + "ln_2.bias"), p + "ln_2.bias")
            _assign(blk.mlp.fc, t.get(p + "mlp.c_fc.weight"), p + "mlp.c_fc.weight")
            _assign(blk.mlp.fc_bias, t.get(p + "mlp.c_fc.bias"), p + "mlp.c_fc.bias")
            _assign(blk.mlp.proj, t.get(p + "mlp.c_proj.weight"), p + "mlp.c_proj.weight")
            _assign(blk.mlp.proj_bias, t.get(p + "mlp.c_proj.bias"), p + "mlp.c_proj.bias")
        _assign(model.final_norm.scale, t.get("ln_f.weight"), "ln_f.weight")
        _assign(model.final_norm.bias, t.get("ln_f.bias"), "ln_f.bias")
        head_names = ("lm_head.weight",)
    else:
        t = _Tensors(tensors, ("model.", ""))
        _assign(model.embed, t.get("embed_tokens.weight"), "embed_tokens.weight", pad_rows=pad_v)
        for i, blk in enumerate(model.blocks):
            p = f"layers.{i}."
            lin = lambda n: t.get(p + n).T  # noqa: E731  nn.Linear [out, in] -> [in, out]
            _assign(blk.attn_norm.scale, t.get(p + "input_layernorm.weight"), p + "input_layernorm.weight")
            _assign(blk.attn.q, lin("self_attn.q_proj.weight").reshape(d, h, hd), p + "self_attn.q_proj.weight")
            _assign(blk.attn.k, lin("self_attn.k_proj.weight").reshape(d, kv, hd), p + "self_attn.k_proj.weight")
            _assign(blk.attn.v, lin("self_attn.v_proj.weight").reshape(d, kv, hd), p + "self_attn.v_proj.weight")
            _assign(blk.attn.o, lin("self_attn.o_proj.weight").reshape(h, hd, d), p + "self_attn.o_proj.weight")
            _assign(blk.mlp_norm.scale, t.get(p + "post_attention_layernorm.weight"),
                    p + "post_attention_layernorm.weight")
            _assign(blk.mlp.gate, lin("mlp.gate_proj.weight"), p + "mlp.gate_proj.weight")
            _assign(blk.mlp.up, lin("mlp.up_proj.weight"), p + "mlp.up_proj.weight")
            _assign(blk.mlp.down, lin("mlp.down_proj.weight"), p + "mlp.down_proj.weight")
        _assign(model.final_norm.scale, t.get("norm.weight"), "norm.weight")
        head_names = ("lm_head.weight",)
    if cfg.tie_embeddings:
        for n in head_names:  # some tied checkpoints also store the (identical) head; it is not used
            t.used.update(k for k in tensors if k.endswith(n))
    else:
        t.prefixes = ("",)
        _assign(model.head, t.get("lm_head.weight").T, "lm_head.weight", pad_cols=pad_v)
    unused = t.unused()
    if unused:
        raise ValueError(f"HF checkpoint: {len(unused)} tensor(s) not used by a {cfg.family} model with "
                         f"n_layers={cfg.n_layers}, e.g. {unused[:5]}; expected the checkpoint to match its config")
    left = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0] if isinstance(v, jax.ShapeDtypeStruct)]
    if left:
        raise ValueError(f"load_hf_state_dict: params {left[:5]} were not assigned; expected every param loaded")


def _read_safetensors_raw(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (8-byte header length, JSON header, raw little-endian data) for dtypes that
    safetensors.numpy cannot return (bfloat16)."""
    import ml_dtypes
    kinds: dict[str, Any] = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                             "BOOL": np.bool_}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in kinds:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected one of {sorted(kinds)}")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data, kinds[info["dtype"]], offset=8 + n + start,
                                  count=(end - start) // np.dtype(kinds[info["dtype"]]).itemsize
                                  ).reshape(info["shape"])
    return out


def read_safetensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    path = pathlib.Path(path)
    try:
        return load_file(str(path))
    except TypeError:  # e.g. "data type 'bfloat16' not understood"
        return _read_safetensors_raw(path)


def read_hf_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of an HF model dir: model.safetensors, or the shards listed in model.safetensors.index.json."""
    path = pathlib.Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: cannot read its weight_map ({e!r}); expected a JSON object with a "
                             f"'weight_map' of tensor name -> shard file") from None
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if pathlib.PurePath(shard).name != shard or not shard.endswith(".safetensors"):
                raise ValueError(f"{index}: shard {shard!r}; expected a .safetensors file name in {path}")
            if not shard_path.exists():
                raise FileNotFoundError(f"{index}: shard {shard!r} is listed in weight_map but {shard_path} does "
                                        f"not exist; expected every shard beside the index")
            tensors.update(read_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index}: tensors {missing[:5]} listed in weight_map but absent from the shards")
        return tensors
    pickled = sorted(n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                                 "flax_model.msgpack") if (path / n).exists())
    if pickled:
        raise ValueError(f"{path}: holds {pickled} but no safetensors weights; these formats are not read (a "
                         f"pytorch_model.bin is a pickle, which can run code). Expected model.safetensors or "
                         f"model.safetensors.index.json: convert it first, e.g. with transformers "
                         f"`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)` (safetensors is its "
                         f"default format) on a machine where loading that pickle is trusted")
    raise FileNotFoundError(f"{path}: expected model.safetensors or model.safetensors.index.json")


def load_hf_dir(path, **overrides) -> tuple[ModelConfig, Transformer]:
    """An HF model directory (config.json + safetensors) -> (ModelConfig, Transformer with its weights).

    `overrides` replace ModelConfig fields (e.g. dtype="bfloat16", vocab_multiple=128)."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: not found; expected a Hugging Face model directory")
    cfg = model_config_from_hf(json.loads(config_file.read_text()), **overrides)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    load_hf_state_dict(model, read_hf_tensors(path))
    return cfg, model


# ----------------------------------------------------------------------------------------------------------------
# Export

# The files an export writes: an existing out_dir holding anything else is not replaced (it may be a workdir).
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "pal_tokenizer.json")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def hf_config_dict(cfg: ModelConfig, tokenizer=None) -> dict:
    """ModelConfig -> an HF config.json dict (model_type llama or gpt2) that transformers and model_config_from_hf
    read back to the same model. Token ids come from `tokenizer` (pal_jax.tokenizer.Tokenizer) when given."""
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    common = {"architectures": [_ARCHITECTURES[cfg.family]], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "dtype": "float32",
              "use_cache": True, "initializer_range": 0.02, **ids}
    if cfg.family == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_len, "n_ctx": cfg.max_len,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    # rope_parameters is transformers 5's key, rope_theta the older one: both are written so either version reads it
    return {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.hd,
            "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "pretraining_tp": 1}


def _pure_params(model_or_params) -> Mapping:
    """A Transformer, an nnx.State of its params, or a pure dict (e.g. restored from a checkpoint) -> pure dict."""
    if isinstance(model_or_params, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    if isinstance(model_or_params, nnx.State):
        return nnx.to_pure_dict(model_or_params)
    if isinstance(model_or_params, Mapping):
        return model_or_params
    raise TypeError(f"export: got {type(model_or_params).__name__}; expected a pal_jax Transformer, an nnx.State "
                    f"of its params or a dict of them")


def _host(x) -> np.ndarray:
    """A (possibly sharded) array -> a float32 numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x)).astype(np.float32)


def hf_state_dict(model_or_params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """pal_jax params -> HF tensors (float32 numpy, the names and layouts transformers uses for `cfg.family`).

    The embedding rows / head columns past cfg.vocab_size (padding to vocab_multiple) are cut off."""
    params = _pure_params(model_or_params)

    def get(*path, shape):
        node = params
        for i, k in enumerate(path):
            if isinstance(node, Mapping) and k not in node and isinstance(k, int) and str(k) in node:
                k = str(k)  # some restorers give list indices as strings
            if not isinstance(node, Mapping) or k not in node:
                raise ValueError(f"export: param {'/'.join(map(str, path[:i + 1]))} not found; expected the params "
                                 f"of a {cfg.family} model with n_layers={cfg.n_layers}")
            node = node[k]
        if tuple(node.shape) != tuple(shape):
            raise ValueError(f"export: param {'/'.join(map(str, path))} has shape {tuple(node.shape)}; expected "
                             f"{tuple(shape)} for the given model config")
        return _host(node)

    V, Vp, d, h, kv, hd, f = (cfg.vocab_size, cfg.padded_vocab, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd,
                              cfg.d_ff)
    out: dict[str, np.ndarray] = {}
    embed = get("embed", shape=(Vp, d))[:V]
    head = None if cfg.tie_embeddings else get("head", shape=(d, Vp))[:, :V].T  # [V, d] like nn.Linear
    if cfg.family == "gpt2":
        out["transformer.wte.weight"] = embed
        out["transformer.wpe.weight"] = get("pos_embed", shape=(cfg.max_len, d))
        for i in range(cfg.n_layers):
            p, b = f"transformer.h.{i}.", ("blocks", i)
            out[p + "ln_1.weight"] = get(*b, "attn_norm", "scale", shape=(d,))
            out[p + "ln_1.bias"] = get(*b, "attn_norm", "bias", shape=(d,))
            out[p + "attn.c_attn.weight"] = np.concatenate(
                [get(*b, "attn", n, shape=(d, h, hd)).reshape(d, h * hd) for n in ("q", "k", "v")], axis=1)
            out[p + "attn.c_attn.bias"] = np.concatenate(
                [get(*b, "attn", n + "_bias", shape=(h, hd)).reshape(h * hd) for n in ("q", "k", "v")])
            out[p + "attn.c_proj.weight"] = get(*b, "attn", "o", shape=(h, hd, d)).reshape(h * hd, d)
            out[p + "attn.c_proj.bias"] = get(*b, "attn", "o_bias", shape=(d,))
            out[p + "ln_2.weight"] = get(*b, "mlp_norm", "scale", shape=(d,))
            out[p + "ln_2.bias"] = get(*b, "mlp_norm", "bias", shape=(d,))
            out[p + "mlp.c_fc.weight"] = get(*b, "mlp", "fc", shape=(d, f))  # Conv1D: [in, out] as stored
            out[p + "mlp.c_fc.bias"] = get(*b, "mlp", "fc_bias", shape=(f,))
            out[p + "mlp.c_proj.weight"] = get(*b, "mlp", "proj", shape=(f, d))
            out[p + "mlp.c_proj.bias"] = get(*b, "mlp", "proj_bias", shape=(d,))
        out["transformer.ln_f.weight"] = get("final_norm", "scale", shape=(d,))
        out["transformer.ln_f.bias"] = get("final_norm", "bias", shape=(d,))
    else:
        out["model.embed_tokens.weight"] = embed
        for i in range(cfg.n_layers):
            p, b = f"model.layers.{i}.", ("blocks", i)
            out[p + "input_layernorm.weight"] = get(*b, "attn_norm", "scale", shape=(d,))
            # nn.Linear stores [out, in]
            out[p + "self_attn.q_proj.weight"] = get(*b, "attn", "q", shape=(d, h, hd)).reshape(d, h * hd).T
            out[p + "self_attn.k_proj.weight"] = get(*b, "attn", "k", shape=(d, kv, hd)).reshape(d, kv * hd).T
            out[p + "self_attn.v_proj.weight"] = get(*b, "attn", "v", shape=(d, kv, hd)).reshape(d, kv * hd).T
            out[p + "self_attn.o_proj.weight"] = get(*b, "attn", "o", shape=(h, hd, d)).reshape(h * hd, d).T
            out[p + "post_attention_layernorm.weight"] = get(*b, "mlp_norm", "scale", shape=(d,))
            out[p + "mlp.gate_proj.weight"] = get(*b, "mlp", "gate", shape=(d, f)).T
            out[p + "mlp.up_proj.weight"] = get(*b, "mlp", "up", shape=(d, f)).T
            out[p + "mlp.down_proj.weight"] = get(*b, "mlp", "down", shape=(f, d)).T
        out["model.norm.weight"] = get("final_norm", "scale", shape=(d,))
    if head is not None:  # tied: transformers ties lm_head to the embedding and the file holds no copy
        out["lm_head.weight"] = head
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _check_replaceable(out: pathlib.Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"export: {out} exists and is not a directory; expected a new or an export directory")
    other = sorted(n for n in os.listdir(out) if n not in EXPORT_FILES)
    if other:
        raise FileExistsError(f"export: {out} holds {other[:5]}, which an export does not write; expected a new "
                              f"directory or an earlier export to replace (choose another output dir)")


def export_hf_dir(model_or_params, model_cfg: ModelConfig | None, out_dir, tokenizer=None) -> str:
    """Write an HF model directory for `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`.

    model_or_params: a Transformer (model_cfg may then be None: its own cfg is used), an nnx.State of its params, or
    a pure dict of them (e.g. from checkpoint.load_params). tokenizer: a pal_jax.tokenizer.Tokenizer, saved beside
    the weights (and its special ids written into config.json). Writes config.json, generation_config.json and
    model.safetensors (float32) into a temporary directory beside out_dir, then renames it to out_dir; an existing
    out_dir is replaced only when it holds nothing but export files. On several processes all must call this (the
    params are gathered) and process 0 writes. Returns out_dir's absolute path."""
    if model_cfg is None:
        if not isinstance(model_or_params, nnx.Module):
            raise ValueError("export_hf_dir: model_cfg is None; expected a ModelConfig when passing params")
        model_cfg = model_or_params.cfg
    if tokenizer is not None and tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"export_hf_dir: the tokenizer has {tokenizer.vocab_size} tokens; expected at most the "
                         f"model's vocab_size={model_cfg.vocab_size}")
    out = pathlib.Path(out_dir).absolute()
    _check_replaceable(out)
    tensors = hf_state_dict(model_or_params, model_cfg)
    if jax.process_index() != 0:
        return str(out)
    from safetensors.numpy import save_file
    hf_cfg = hf_config_dict(model_cfg, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"_from_model_config": True, **{k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if out.exists():
            _check_replaceable(out)
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(v.size for v in tensors.values())
    logging.info("export: %s model, %s params (vocab %d), to %s", model_cfg.family, f"{n:,}", model_cfg.vocab_size,
                 out)
    return str(out)


def checkpoint_tokenizer(workdir: str, saved_config: Mapping, tokenizer_path: str = ""):
    """The tokenizer of a checkpoint, found as pal_jax.predict does: `tokenizer_path`, else WORKDIR/tokenizer, else
    the tokenizer path the run was configured with. None when there is none."""
    from pal_jax import tokenizer as tok_lib
    in_workdir = os.path.join(workdir, "tokenizer")
    path = tokenizer_path or (in_workdir if os.path.exists(os.path.join(in_workdir, "tokenizer.json"))
                              else (saved_config.get("tokenizer") or {}).get("path", ""))
    return tok_lib.load_tokenizer(path) if path else None


def load_checkpoint(workdir: str, tokenizer_path: str = ""):
    """A pal_jax checkpoint (workdir or checkpoints dir) -> (ModelConfig, params pure dict on the host CPU, tokenizer
    or None, step). The model shape comes from the checkpoint's saved config (vocab_size 0 = the tokenizer's)."""
    from pal_jax import checkpoint as ckpt_lib
    from pal_jax import mesh as mesh_lib
    from pal_jax import train
    workdir = os.fspath(workdir)
    meta = ckpt_lib.load_meta(workdir)
    saved = meta.get("config") or {}
    if "model" not in saved:
        raise ValueError(f"{workdir}: the checkpoint's saved config has no 'model' section; expected a checkpoint "
                         f"written by pal_jax training (stage1 or stage2)")
    tok = checkpoint_tokenizer(workdir, saved, tokenizer_path)
    if tok is None and saved["model"].get("vocab_size", 0) == 0:
        raise FileNotFoundError(f"no tokenizer for {workdir}: its model takes vocab_size from the tokenizer; expected "
                                f"{workdir}/tokenizer/tokenizer.json or a tokenizer path (config.tokenizer.path)")
    cfg = train.model_config(saved["model"], tok.vocab_size if tok is not None else 1)
    from pal_jax import lora
    if lora.lora_config(saved) is not None:  # adapters only: merged into their base (W + alpha/r A B)
        cpu_mesh = jax.make_mesh((1, 1, 1), mesh_lib.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                                 devices=jax.local_devices(backend="cpu")[:1])  # export is a host operation
        rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in saved["mesh"]["axis_rules"])
        ms = train.ModelState(cfg, cpu_mesh, rules)
        return cfg, lora.checkpoint_params(workdir, ms), tok, int(meta["step"])
    abstract_state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])  # export is a host operation
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                            nnx.to_pure_dict(abstract_state))
    params, step = ckpt_lib.load_params(workdir, abstract)
    return cfg, params, tok, step


def export_checkpoint(workdir, out_dir, tokenizer_path: str = "") -> dict:
    """Export the latest checkpoint of a pal_jax run (stage1/stage2 workdir) as an HF model dir with its tokenizer.

    Returns a summary dict (output_dir, step, family, vocab_size, params)."""
    cfg, params, tok, step = load_checkpoint(workdir, tokenizer_path)
    if tok is None:
        logging.warning("export: no tokenizer found for %s; exporting the model without tokenizer files", workdir)
    out = export_hf_dir(params, cfg, out_dir, tokenizer=tok)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"output_dir": out, "step": step, "family": cfg.family, "vocab_size": cfg.vocab_size, "params": n,
            "tokenizer": tok.source if tok is not None else "none"}


def run_export(config, workdir: str) -> dict:
    """The `export` mode: WORKDIR's latest checkpoint -> config.export.output_dir (empty: WORKDIR/hf)."""
    out = config.export.output_dir or os.path.join(workdir, "hf")
    return export_checkpoint(workdir, out, tokenizer_path=config.tokenizer.path)
