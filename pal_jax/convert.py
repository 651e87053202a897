"""Import Hugging Face checkpoints (config.json + safetensors) into pal_jax models.

Supported model_type: "gpt2" (GPT2LMHeadModel) and "llama" (LlamaForCausalLM and compatible, e.g. SmolLM2).
Layouts: GPT-2 stores Conv1D weights as [in, out] with q/k/v fused in c_attn; Llama stores nn.Linear weights as
[out, in]. Both are reshaped into the model's [embed, heads, head_dim] / [heads, head_dim, embed] kernels.
No torch and no pickle: tensors are read with safetensors' numpy loader.
"""
from __future__ import annotations

import json
import pathlib
import struct
from typing import Any

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
        raise ValueError(f"HF config: model_type={mt!r} is not supported; expected one of {SUPPORTED}")
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
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(path / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index}: tensors {missing[:5]} listed in weight_map but absent from the shards")
        return tensors
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
