"""The Hugging Face model families pal_jax reads and writes: per family, one key table and one config translation.

A key table lists, for every tensor of an HF checkpoint, its name ("{i}" = the layer), the pal_jax param(s) it
holds (several = fused along the HF tensor's last axis, GPT-2's c_attn), the layout that relates the two, and when
it exists (a ModelConfig predicate: a bias only with its flag). pal_jax/weights/hf.py walks the same table to import
(checking every tensor's stored shape before any reshape or transpose) and to export.

Families (HF model_type -> the pal_jax model):
  gpt2                  family "gpt2"
  llama, qwen2, qwen3,  family "llama" with variant flags: Qwen2 = q/k/v biases; Qwen3 = per-head q/k RMSNorm
  mistral               (and attention_bias on q/k/v/o); Llama attention_bias (q/k/v/o) and mlp_bias; Mistral
                        sliding_window (a banded causal mask); RoPE "default", "linear", "llama3" or "yarn"
                        (pal_jax.model.transformer.rope_inv_freq). Qwen's use_sliding_window (some layers only) is refused.
An export writes the first family, in the order of LLAMA_LIKE, that expresses the config's flags (a Mistral without
sliding window is written as llama: the same model).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import numpy as np

from pal_jax.model.transformer import ModelConfig

# ----------------------------------------------------------------------------------------------------------------
# Layouts: (HF shape from the param shape and config, HF tensor -> param, param -> HF tensor). nn.Linear stores
# [out, in]; GPT-2's Conv1D stores [in, out]. The vocab layouts cut or pad the rows past cfg.vocab_size.


def _vocab_rows_shape(s, cfg):
    return (cfg.vocab_size, s[1])


LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    # identity (norm scales, biases of one axis, Conv1D matrices)
    "same": (lambda s, c: tuple(s), lambda w, s, c: w, lambda p, c: p),
    # nn.Linear matrix [out, in] <-> [in, out]
    "linear": (lambda s, c: (s[1], s[0]), lambda w, s, c: w.T, lambda p, c: p.T),
    # nn.Linear into heads [n*hd, d] <-> [d, n, hd] (q, k, v)
    "linear_to_heads": (lambda s, c: (s[1] * s[2], s[0]), lambda w, s, c: w.T.reshape(s),
                        lambda p, c: p.reshape(p.shape[0], -1).T),
    # nn.Linear out of heads [d, n*hd] <-> [n, hd, d] (o)
    "linear_from_heads": (lambda s, c: (s[2], s[0] * s[1]), lambda w, s, c: w.T.reshape(s),
                          lambda p, c: p.reshape(-1, p.shape[-1]).T),
    # Conv1D into heads [d, n*hd] <-> [d, n, hd] (GPT-2 c_attn, one part)
    "conv_to_heads": (lambda s, c: (s[0], s[1] * s[2]), lambda w, s, c: w.reshape(s),
                      lambda p, c: p.reshape(p.shape[0], -1)),
    # Conv1D out of heads [n*hd, d] <-> [n, hd, d] (GPT-2 attn.c_proj)
    "conv_from_heads": (lambda s, c: (s[0] * s[1], s[2]), lambda w, s, c: w.reshape(s),
                        lambda p, c: p.reshape(-1, p.shape[-1])),
    # a per-head bias [n*hd] <-> [n, hd]
    "heads_bias": (lambda s, c: (s[0] * s[1],), lambda w, s, c: w.reshape(s), lambda p, c: p.reshape(-1)),
    # embedding [V, d] <-> [padded V, d]
    "vocab_rows": (_vocab_rows_shape, lambda w, s, c: np.pad(w, ((0, s[0] - w.shape[0]), (0, 0))),
                   lambda p, c: p[:c.vocab_size]),
    # untied LM head (nn.Linear) [V, d] <-> [d, padded V]
    "vocab_head": (lambda s, c: (c.vocab_size, s[0]), lambda w, s, c: np.pad(w.T, ((0, 0), (0, s[1] - w.shape[0]))),
                   lambda p, c: p[:, :c.vocab_size].T),
}


@dataclasses.dataclass(frozen=True)
class Key:
    hf: str  # the HF tensor name; "{i}" = layer index
    params: tuple[str, ...]  # pal_jax param paths ("blocks.{i}.attn.q"); several = fused along the last HF axis
    layout: str  # a LAYOUTS name, applied to each part
    when: Callable[[ModelConfig], bool] | None = None  # None = always present

    def present(self, cfg: ModelConfig) -> bool:
        return self.when is None or bool(self.when(cfg))


def _untied(c):
    return not c.tie_embeddings


# Llama, Qwen2, Qwen3 and Mistral share these names; the flags decide which optional tensors exist.
LLAMA_KEYS = (
    Key("model.embed_tokens.weight", ("embed",), "vocab_rows"),
    Key("model.layers.{i}.input_layernorm.weight", ("blocks.{i}.attn_norm.scale",), "same"),
    Key("model.layers.{i}.self_attn.q_proj.weight", ("blocks.{i}.attn.q",), "linear_to_heads"),
    Key("model.layers.{i}.self_attn.k_proj.weight", ("blocks.{i}.attn.k",), "linear_to_heads"),
    Key("model.layers.{i}.self_attn.v_proj.weight", ("blocks.{i}.attn.v",), "linear_to_heads"),
    Key("model.layers.{i}.self_attn.q_proj.bias", ("blocks.{i}.attn.q_bias",), "heads_bias", lambda c: c.qkv_bias),
    Key("model.layers.{i}.self_attn.k_proj.bias", ("blocks.{i}.attn.k_bias",), "heads_bias", lambda c: c.qkv_bias),
    Key("model.layers.{i}.self_attn.v_proj.bias", ("blocks.{i}.attn.v_bias",), "heads_bias", lambda c: c.qkv_bias),
    Key("model.layers.{i}.self_attn.q_norm.weight", ("blocks.{i}.attn.q_norm",), "same", lambda c: c.qk_norm),
    Key("model.layers.{i}.self_attn.k_norm.weight", ("blocks.{i}.attn.k_norm",), "same", lambda c: c.qk_norm),
    Key("model.layers.{i}.self_attn.o_proj.weight", ("blocks.{i}.attn.o",), "linear_from_heads"),
    Key("model.layers.{i}.self_attn.o_proj.bias", ("blocks.{i}.attn.o_bias",), "same", lambda c: c.o_bias),
    Key("model.layers.{i}.post_attention_layernorm.weight", ("blocks.{i}.mlp_norm.scale",), "same"),
    Key("model.layers.{i}.mlp.gate_proj.weight", ("blocks.{i}.mlp.gate",), "linear"),
    Key("model.layers.{i}.mlp.up_proj.weight", ("blocks.{i}.mlp.up",), "linear"),
    Key("model.layers.{i}.mlp.down_proj.weight", ("blocks.{i}.mlp.down",), "linear"),
    Key("model.layers.{i}.mlp.gate_proj.bias", ("blocks.{i}.mlp.gate_bias",), "same", lambda c: c.mlp_bias),
    Key("model.layers.{i}.mlp.up_proj.bias", ("blocks.{i}.mlp.up_bias",), "same", lambda c: c.mlp_bias),
    Key("model.layers.{i}.mlp.down_proj.bias", ("blocks.{i}.mlp.down_bias",), "same", lambda c: c.mlp_bias),
    Key("model.norm.weight", ("final_norm.scale",), "same"),
    Key("lm_head.weight", ("head",), "vocab_head", _untied),
)

GPT2_KEYS = (
    Key("transformer.wte.weight", ("embed",), "vocab_rows"),
    Key("transformer.wpe.weight", ("pos_embed",), "same"),
    Key("transformer.h.{i}.ln_1.weight", ("blocks.{i}.attn_norm.scale",), "same"),
    Key("transformer.h.{i}.ln_1.bias", ("blocks.{i}.attn_norm.bias",), "same"),
    Key("transformer.h.{i}.attn.c_attn.weight", ("blocks.{i}.attn.q", "blocks.{i}.attn.k", "blocks.{i}.attn.v"),
        "conv_to_heads"),
    Key("transformer.h.{i}.attn.c_attn.bias",
        ("blocks.{i}.attn.q_bias", "blocks.{i}.attn.k_bias", "blocks.{i}.attn.v_bias"), "heads_bias"),
    Key("transformer.h.{i}.attn.c_proj.weight", ("blocks.{i}.attn.o",), "conv_from_heads"),
    Key("transformer.h.{i}.attn.c_proj.bias", ("blocks.{i}.attn.o_bias",), "same"),
    Key("transformer.h.{i}.ln_2.weight", ("blocks.{i}.mlp_norm.scale",), "same"),
    Key("transformer.h.{i}.ln_2.bias", ("blocks.{i}.mlp_norm.bias",), "same"),
    Key("transformer.h.{i}.mlp.c_fc.weight", ("blocks.{i}.mlp.fc",), "same"),
    Key("transformer.h.{i}.mlp.c_fc.bias", ("blocks.{i}.mlp.fc_bias",), "same"),
    Key("transformer.h.{i}.mlp.c_proj.weight", ("blocks.{i}.mlp.proj",), "same"),
    Key("transformer.h.{i}.mlp.c_proj.bias", ("blocks.{i}.mlp.proj_bias",), "same"),
    Key("transformer.ln_f.weight", ("final_norm.scale",), "same"),
    Key("transformer.ln_f.bias", ("final_norm.bias",), "same"),
    Key("lm_head.weight", ("head",), "vocab_head", _untied),
)


def key_table(cfg: ModelConfig) -> tuple[Key, ...]:
    return GPT2_KEYS if cfg.family == "gpt2" else LLAMA_KEYS


# ----------------------------------------------------------------------------------------------------------------
# Config translation


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise ValueError(f"{where}: key {key!r} missing from the HF config; expected it for this model_type")
    return hf[key]


def _gpt2_from_hf(hf: dict, where: str) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: activation_function={act!r}; expected 'gelu_new' (tanh GELU)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{where}: scale_attn_by_inverse_layer_idx=True is not supported; expected False")
    if not hf.get("scale_attn_weights", True):
        raise ValueError(f"{where}: scale_attn_weights=False is not supported; expected True")
    d = _need(hf, "n_embd", where)
    n_heads = _need(hf, "n_head", where)
    return dict(family="gpt2", vocab_size=_need(hf, "vocab_size", where), d_model=d,
                n_layers=_need(hf, "n_layer", where), n_heads=n_heads, n_kv_heads=n_heads,
                d_ff=hf.get("n_inner") or 4 * d, max_len=_need(hf, "n_positions", where),
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
    return {"n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_len, "n_ctx": cfg.max_len, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}


def rope_from_hf(hf: dict, where: str) -> dict:
    """The RoPE fields of a ModelConfig from an HF config, read as transformers 5.24 reads them
    (configuration_utils / modeling_rope_utils.convert_rope_params_to_dict): a non-empty `rope_scaling` (the
    transformers-4 key) replaces `rope_parameters`; theta is that dict's rope_theta, else the top-level
    rope_theta, else 10000; the type is its rope_type, else its legacy "type", else "default"."""
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")

    def effective(rope: dict) -> dict:  # what one key alone would give
        out = {k: v for k, v in rope.items() if k != "type"}
        out.setdefault("rope_type", rope.get("type", "default"))
        out.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        return out

    if scaling and params and effective(scaling) != effective(params):
        logging.warning("%s: rope_scaling=%s and rope_parameters=%s disagree; following rope_scaling, as "
                        "transformers does", where, scaling, params)
    rope = dict(scaling or params or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{where}: rope parameters nested per layer type ({sorted(rope)}); expected one flat dict")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={rope.get('partial_rotary_factor')}; expected 1.0")
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    key = "rope_scaling" if scaling else "rope_parameters"
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return dict(out, rope_factor=float(_need(rope, "factor", f"{where} {key}")))
    if rope_type == "llama3":
        w = f"{where} {key}"
        return dict(out, rope_factor=float(_need(rope, "factor", w)),
                    rope_low_freq_factor=float(_need(rope, "low_freq_factor", w)),
                    rope_high_freq_factor=float(_need(rope, "high_freq_factor", w)),
                    rope_original_max_len=int(_need(rope, "original_max_position_embeddings", w)))
    if rope_type == "yarn":
        w = f"{where} {key}"
        original = int(_need(rope, "original_max_position_embeddings", w))
        factor = rope.get("factor")
        if factor is None:  # transformers: the ratio of the context lengths
            factor = float(hf.get("max_position_embeddings") or 2048) / original
        factor = float(factor)
        attention = rope.get("attention_factor")
        if attention is None:  # transformers' default (mscale), resolved here
            def mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        return dict(out, rope_factor=factor, rope_original_max_len=original, rope_attention_factor=float(attention),
                    rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                    rope_truncate=bool(rope.get("truncate", True)))
    raise ValueError(f"{where}: {key} rope_type={rope_type!r} is not supported; expected 'default', 'linear', "
                     f"'llama3' or 'yarn'")


def rope_to_hf(cfg: ModelConfig) -> dict:
    """config.json RoPE keys that transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters) both read."""
    params = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        params["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        params.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_len)
    if cfg.rope_type == "yarn":
        params.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                      attention_factor=cfg.rope_attention_factor, beta_fast=cfg.rope_beta_fast,
                      beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
    out = {"rope_theta": cfg.rope_theta, "rope_parameters": params}
    if cfg.rope_type != "default":
        out["rope_scaling"] = dict(params)
    return out


@dataclasses.dataclass(frozen=True)
class LlamaLike:
    """A family with Llama's tensor names: its config.json defaults and which variant flags it has."""
    model_type: str
    architecture: str
    fixed: dict  # ModelConfig flags the family always has (Qwen2: q/k/v biases)
    attention_bias: bool  # config.json attention_bias -> qkv_bias and o_bias
    mlp_bias: bool  # config.json mlp_bias -> mlp_bias
    defaults: dict  # config.json values transformers assumes when the key is absent
    sliding_window: bool = False  # config.json sliding_window -> sliding_window (on every layer: Mistral)
    export_extra: dict = dataclasses.field(default_factory=dict)  # more config.json keys an export writes

    def from_hf(self, hf: dict, where: str) -> dict:
        get = lambda k: hf.get(k, self.defaults.get(k))  # noqa: E731
        act = get("hidden_act") or "silu"
        if act != "silu":
            raise ValueError(f"{where}: hidden_act={act!r}; expected 'silu'")
        fields = dict(self.fixed)
        for key, allowed in (("attention_bias", self.attention_bias), ("mlp_bias", self.mlp_bias)):
            if hf.get(key, False) and not allowed:
                raise ValueError(f"{where}: {key}=True; expected False ({self.model_type} has no such option)")
        if self.attention_bias:
            fields.update(qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)))
        if self.mlp_bias:
            fields["mlp_bias"] = bool(hf.get("mlp_bias", False))
        kinds = sorted(set(hf.get("layer_types") or ()) - {"full_attention"})
        if kinds and not self.sliding_window:
            raise ValueError(f"{where}: layer_types holds {kinds}; expected only 'full_attention' layers")
        if self.sliding_window:
            fields["sliding_window"] = int(get("sliding_window") or 0)
        elif get("use_sliding_window") and get("sliding_window"):  # Qwen: a window from layer max_window_layers on
            raise ValueError(f"{where}: use_sliding_window=True with sliding_window={get('sliding_window')} is not "
                             f"supported (a window on some layers only); expected use_sliding_window=False")
        d = _need(hf, "hidden_size", where)
        n_heads = _need(hf, "num_attention_heads", where)
        head_dim = get("head_dim") or d // n_heads
        fields.update(family="llama", vocab_size=_need(hf, "vocab_size", where), d_model=d,
                      n_layers=_need(hf, "num_hidden_layers", where), n_heads=n_heads,
                      n_kv_heads=get("num_key_value_heads") or n_heads,
                      head_dim=0 if head_dim * n_heads == d else head_dim,
                      d_ff=_need(hf, "intermediate_size", where), max_len=get("max_position_embeddings") or 2048,
                      norm_eps=float(get("rms_norm_eps") or 1e-6),
                      tie_embeddings=bool(get("tie_word_embeddings")), **rope_from_hf(hf, where))
        return fields

    def expresses(self, cfg: ModelConfig) -> bool:
        """Whether this family's config.json can describe cfg (its flags)."""
        flags = {"qkv_bias": cfg.qkv_bias, "o_bias": cfg.o_bias, "mlp_bias": cfg.mlp_bias, "qk_norm": cfg.qk_norm,
                 "sliding_window": cfg.sliding_window}
        want = {"qkv_bias": False, "o_bias": False, "mlp_bias": False, "qk_norm": False, "sliding_window": 0,
                **self.fixed}
        if self.sliding_window:
            want["sliding_window"] = cfg.sliding_window
        if self.attention_bias:
            if cfg.qkv_bias != cfg.o_bias:
                return False
            want.update(qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias)
        if self.mlp_bias:
            want["mlp_bias"] = cfg.mlp_bias
        return flags == want

    def to_hf(self, cfg: ModelConfig) -> dict:
        out = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
               "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.hd, "intermediate_size": cfg.d_ff,
               "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
               "attention_dropout": 0.0, **rope_to_hf(cfg)}
        if self.attention_bias:
            out["attention_bias"] = cfg.qkv_bias
        if self.mlp_bias:
            out["mlp_bias"] = cfg.mlp_bias
        if self.sliding_window:
            out["sliding_window"] = cfg.sliding_window or None
        return {**out, **self.export_extra}


# Export order: the first that expresses a config is written.
LLAMA_LIKE = {
    "llama": LlamaLike("llama", "LlamaForCausalLM", {}, attention_bias=True, mlp_bias=True,
                       defaults={"tie_word_embeddings": False, "max_position_embeddings": 2048},
                       export_extra={"pretraining_tp": 1}),
    "qwen2": LlamaLike("qwen2", "Qwen2ForCausalLM", {"qkv_bias": True}, attention_bias=False, mlp_bias=False,
                       defaults={"tie_word_embeddings": False, "max_position_embeddings": 32768,
                                 "num_key_value_heads": 32},
                       export_extra={"use_sliding_window": False, "sliding_window": None}),
    "qwen3": LlamaLike("qwen3", "Qwen3ForCausalLM", {"qk_norm": True}, attention_bias=True, mlp_bias=False,
                       defaults={"tie_word_embeddings": False, "max_position_embeddings": 32768, "head_dim": 128,
                                 "num_key_value_heads": 32},
                       export_extra={"use_sliding_window": False, "sliding_window": None}),
    "mistral": LlamaLike("mistral", "MistralForCausalLM", {}, attention_bias=False, mlp_bias=False,
                         defaults={"tie_word_embeddings": False, "max_position_embeddings": 4096 * 32,
                                   "sliding_window": 4096, "num_key_value_heads": 8}, sliding_window=True),
}
SUPPORTED = ("gpt2", *LLAMA_LIKE)


def fields_from_hf(hf: dict) -> dict:
    """HF config.json dict -> ModelConfig fields (unsupported model types and options: ValueError naming them)."""
    mt = hf.get("model_type")
    where = f"HF config (model_type={mt!r})"
    if mt == "gpt2":
        return _gpt2_from_hf(hf, where)
    if mt in LLAMA_LIKE:
        return LLAMA_LIKE[mt].from_hf(hf, where)
    arch = hf.get("architectures")
    remote = " (it names custom code in auto_map; remote code is never run)" if "auto_map" in hf else ""
    raise ValueError(f"HF config: model_type={mt!r} (architectures={arch}) is not supported{remote}; "
                     f"expected one of {SUPPORTED}")


def hf_family(cfg: ModelConfig) -> tuple[str, str, dict]:
    """(model_type, architecture, the family's config.json keys) to export cfg as."""
    if cfg.family == "gpt2":
        return "gpt2", "GPT2LMHeadModel", _gpt2_to_hf(cfg)
    for fam in LLAMA_LIKE.values():
        if fam.expresses(cfg):
            return fam.model_type, fam.architecture, fam.to_hf(cfg)
    flags = {k: getattr(cfg, k) for k in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "sliding_window")}
    raise ValueError(f"export: no Hugging Face family holds a llama model with {flags}; expected the flags of one "
                     f"of {tuple(LLAMA_LIKE)} (Qwen2: qkv_bias only; Llama/Qwen3: qkv_bias == o_bias)")


def expected_hf_shape(key: Key, param_shapes: list[tuple[int, ...]], cfg: ModelConfig) -> tuple[int, ...]:
    """The stored shape of `key`'s HF tensor for params of these shapes (fused parts: concatenated on the last
    axis)."""
    shape_fn = LAYOUTS[key.layout][0]
    parts = [tuple(shape_fn(s, cfg)) for s in param_shapes]
    if len(parts) == 1:
        return parts[0]
    return (*parts[0][:-1], sum(p[-1] for p in parts))


def split_fused(w: np.ndarray, key: Key, param_shapes, cfg: ModelConfig) -> list[np.ndarray]:
    shape_fn = LAYOUTS[key.layout][0]
    sizes = [shape_fn(s, cfg)[-1] for s in param_shapes]
    return np.split(w, np.cumsum(sizes)[:-1], axis=-1) if len(sizes) > 1 else [w]
