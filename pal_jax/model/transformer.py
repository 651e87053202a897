"""Decoder-only transformer in Flax NNX: the llama family and the gpt2 family.

llama: RoPE (HF rotate-half convention, configurable theta; linear or Llama-3.1 scaling), grouped-query attention,
RMSNorm, SwiGLU MLP, tied or untied LM head; optional q/k/v, output and MLP biases and per-head q/k RMSNorm (the
Qwen2, Qwen3 and Llama attention_bias / mlp_bias variants); optional sliding-window attention (Mistral).
gpt2: learned position table, LayerNorm with bias, tanh-GELU MLP, biases on every projection, final LayerNorm.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names (e.g. ("vocab", "embed"));
`nnx.get_partition_spec(nnx.state(model, nnx.Param))` returns them, and inside `nnx.logical_axis_rules(rules)` it
returns mesh axes. Params are sharded eagerly at creation only when the model is built under a mesh *and* logical
axis rules (and flax's eager sharding is on); otherwise the names are metadata only (use jit out_shardings), so the
model also builds under `nnx.eval_shape` with no mesh.

LoRA (`Transformer(cfg, rngs=..., lora=LoraConfig(rank, alpha, targets))`, rank > 0): each targeted projection W
gets two `nnx.LoRAParam`s, A (its input axes + rank, random) and B (rank + its output axes, zero), and computes
x W + (alpha / rank) (x A) B. A's logical axes are W's input axes with `None` for the rank, B's are `None` and W's
output axes, so they shard like the base weight. The base params are drawn first from the same rng stream, so a
LoRA model's base equals the plain model's for the same seed; with lora None (or rank 0) the model is the plain one.
`pal_jax/model/lora.py` trains the adapters on a frozen base and merges them back into W.

Numerics: norms, RoPE, attention scores/softmax and logits are float32; matmuls run in `cfg.dtype`.

Attention (`cfg.attention`, config key model.attention; a run-time choice, not a property of the weights):
- "xla" (default): `attend`, einsum + mask + softmax over the whole T x S score matrix, in every path.
- "xla_chunked": "xla" with the training forward's causal self-attention in chunks of query rows, each against the
  keys up to its own end (`attend_causal`: the blocks above the diagonal, masked anyway, are not computed). The same
  numbers up to float rounding, faster on CPU (benchmarks/README.md, section 7); not the default because float
  rounding alone moves the tiny main job's report (docs/results.md, "Sensitivity to float rounding").
- "dot_product_attention": `jax.nn.dot_product_attention` with implementation=None. The training forward passes
  causality and the sliding window as is_causal / local_window_size and only padding keys and packed segments as a
  boolean mask [B,1,T,S]; the KV-cache decode path passes its whole [B,1,T,S] mask (queries sit at cache slots
  cache_index.., which is_causal cannot express). In jax 0.10.2 implementation=None is the XLA implementation on
  every backend (jax's own note: "currently falls back to xla"), so this choice does not reach cuDNN's flash
  attention by itself; cuDNN needs implementation="cudnn", fp16/bf16 and a head_dim <= 128 (256 on Hopper) that is a
  multiple of 8, and turns a boolean mask into a dense bias.
- "splash": the Pallas TPU splash attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), in the
  training forward (`hidden_states`): a causal or sliding-window (LocalMask) block-sparse mask, padding keys and
  packed segments as SegmentIds, every head's block map built once per shape. The kernel is per-device: under a
  mesh it runs in `jax.shard_map`, rows split over the batch axes, heads over `tensor` when both head counts divide
  it. Sequence lengths must be multiples of SPLASH_BLOCK (a ConfigError says so). On devices other than TPU it runs in
  Pallas interpret mode (the kernel as ordinary JAX ops: the same numbers, many times slower than "xla"; logged
  once), which is what the CPU parity tests use. The decode path (`decode`: KV cache, T queries against S cache
  slots) uses "xla"'s `attend_cache`.
A query with no visible key (a padding query of a left-padded row) gets a finite output that differs between the
implementations ("xla" and "dot_product_attention": the mean of every value; "xla_chunked" in the training
forward: of the values up to its chunk's end; "splash": of the values of the blocks it computes); no real token
attends to it, so no real token's output depends on it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pal_jax.core.errors import ConfigError

FAMILIES = ("llama", "gpt2")
ATTENTION = ("xla", "xla_chunked", "dot_product_attention", "splash")  # model.attention (module doc)
SPLASH_BLOCK = 128  # the splash kernel's tile: its sequence lengths must be multiples of this
# ModelConfig fields that say how the model is computed, not what its params are: a checkpoint restores, resumes and
# serves as a reference under any value (the run's config decides), and they are no input of a pipeline phase
RUN_TIME_FIELDS = ("attention",)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NEG = -1e30  # masked attention score: finite, so a query row with no visible key stays finite (uniform)
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"  # "llama" | "gpt2"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4  # gpt2: must equal n_heads
    head_dim: int = 0  # 0 -> d_model // n_heads
    d_ff: int = 512
    max_len: int = 512  # gpt2: learned position table size; llama: longest sequence / cache
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    vocab_multiple: int = 1  # embedding rows padded up to a multiple of this; logits sliced back to vocab_size
    dtype: str = "float32"  # activation/compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # jax.checkpoint each block
    # std of the normal random init of every weight matrix (residual-output projections: / sqrt(2 n_layers));
    # only a random init reads it. 0.02 is GPT-2's; a narrow model learns attention patterns sooner from
    # 1/sqrt(d_model) (docs/method.md)
    init_std: float = INIT_STD
    # llama-family variants, for the Hugging Face families that share Llama's layout (pal_jax/weights/hf.py):
    qkv_bias: bool = False  # biases on q, k, v (Qwen2; Llama and Qwen3 attention_bias)
    o_bias: bool = False  # a bias on the attention output projection (Llama and Qwen3 attention_bias)
    mlp_bias: bool = False  # biases on gate, up and down (Llama mlp_bias)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before RoPE (Qwen3)
    rope_type: str = "default"  # "default" | "linear" (positions / rope_factor) | "llama3" (Llama-3.1 scaling)
    rope_factor: float = 1.0  # linear, llama3: the scaling factor
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_len: int = 0  # llama3, yarn: original_max_position_embeddings (the pretraining context)
    rope_attention_factor: float = 1.0  # yarn: cos and sin are scaled by it (transformers' attention_scaling)
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_truncate: bool = True  # yarn: round the correction range to whole dims
    # 0 = full causal attention; W > 0: a query sees itself and the W - 1 keys before it (Mistral sliding_window)
    sliding_window: int = 0
    # the attention implementation, one of ATTENTION (module doc). A run-time choice: the params are the same, and a
    # restored checkpoint takes the run's (spec.model_config), not the one it was trained with
    attention: str = "xla"

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: expected {expected}")

        if self.family not in FAMILIES:
            bad("family", f"one of {FAMILIES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len",
                     "vocab_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "a positive integer")
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 0:
            bad("head_dim", "an integer >= 0 (0 = d_model // n_heads)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                bad(name, "a positive number")
        for name in ("tie_embeddings", "remat"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                bad(name, f"one of {tuple(DTYPES)}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            bad("n_heads", f"a divisor of d_model={self.d_model} (or set head_dim)")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"a divisor of n_heads={self.n_heads}")
        if self.family == "gpt2" and self.n_kv_heads != self.n_heads:
            bad("n_kv_heads", f"n_kv_heads == n_heads={self.n_heads} for family 'gpt2'")
        if self.family == "llama" and self.hd % 2:
            bad("head_dim", f"an even head size for RoPE (got head size {self.hd})")
        for name in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
            if getattr(self, name) and self.family != "llama":
                bad(name, "False for family 'gpt2' (its biases are built in)")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"one of {ROPE_TYPES}")
        if self.rope_type != "default" and self.family != "llama":
            bad("rope_type", "'default' for family 'gpt2' (no RoPE)")
        if not isinstance(self.rope_truncate, bool):
            bad("rope_truncate", "True or False")
        if self.rope_type == "yarn" and self.rope_original_max_len < 1:
            bad("rope_original_max_len", "a positive integer for rope_type 'yarn'")
        for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_attention_factor",
                     "rope_beta_fast", "rope_beta_slow"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                bad(name, "a positive number")
        if not isinstance(self.rope_original_max_len, int) or self.rope_original_max_len < 0:
            bad("rope_original_max_len", "an integer >= 0")
        if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window < 0:
            bad("sliding_window", "an integer >= 0 (0 = none)")
        if self.sliding_window and self.family != "llama":
            bad("sliding_window", "0 for family 'gpt2'")
        if self.attention not in ATTENTION:
            bad("attention", f"one of {ATTENTION}")
        if self.rope_type == "llama3":
            if self.rope_original_max_len < 1:
                bad("rope_original_max_len", "a positive integer for rope_type 'llama3'")
            if not self.rope_high_freq_factor > self.rope_low_freq_factor:
                bad("rope_high_freq_factor", f"> rope_low_freq_factor={self.rope_low_freq_factor} for 'llama3'")

    @property
    def hd(self) -> int:
        """Size of one attention head."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dict or ml_collections ConfigDict; an unknown key is a ValueError naming it."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        d = dict(d)
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"ModelConfig: unknown key(s) {unknown}; expected keys from {allowed}")
        for f in dataclasses.fields(cls):  # ints are fine where a float is expected (e.g. rope_theta=10000)
            if f.type == "float" and f.name in d and isinstance(d[f.name], int) and not isinstance(d[f.name], bool):
                d[f.name] = float(d[f.name])
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Projections LoRA may target, per family, by param name (attention q/k/v/o; the MLP's matrices).
LORA_TARGETS = {"llama": ("q", "k", "v", "o", "gate", "up", "down"), "gpt2": ("q", "k", "v", "o", "fc", "proj")}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: rank r, scale alpha / r, on the projections named in `targets` (see LORA_TARGETS)."""
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank = {self.rank!r}: expected a positive integer")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha = {self.alpha!r}: expected a positive number")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoraConfig.targets = {self.targets!r}: expected distinct projection names")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def check_family(self, family: str) -> None:
        bad = [t for t in self.targets if t not in LORA_TARGETS[family]]
        if bad:
            raise ValueError(f"LoraConfig.targets: {bad} are not projections of a {family} model; expected names "
                             f"from {LORA_TARGETS[family]}")


# ----------------------------------------------------------------------------------------------------------------
# Parameters and small layers


def _eager() -> bool:
    """Shard at creation only under a mesh with logical axis rules (otherwise names are metadata only)."""
    return (nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
            and bool(core_spmd.get_logical_axis_rules()))


def _param(rngs: nnx.Rngs | None, shape, names: tuple[str, ...], cfg: ModelConfig, init: str = "normal",
           std: float | None = None) -> nnx.Param:
    dtype = DTYPES[cfg.param_dtype]
    std = cfg.init_std if std is None else std
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=_eager())


def _add_adapters(module: nnx.Module, name: str, n_in: int, lora: LoraConfig, cfg: ModelConfig, rngs: nnx.Rngs):
    """Attach `{name}_lora_a` [in..., r] (normal, std 1/sqrt(fan_in)) and `{name}_lora_b` [r, out...] (zeros) to
    `module` for its projection param `name`, whose first n_in axes are the input axes."""
    w = getattr(module, name)
    names = w.get_metadata()["out_sharding"]
    in_shape, out_shape = tuple(w.shape[:n_in]), tuple(w.shape[n_in:])
    dtype = DTYPES[cfg.param_dtype]
    a = jax.random.normal(rngs.params(), (*in_shape, lora.rank), dtype) / math.sqrt(math.prod(in_shape))
    b = jnp.zeros((lora.rank, *out_shape), dtype)
    setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, out_sharding=(*names[:n_in], None), eager_sharding=_eager()))
    setattr(module, f"{name}_lora_b", nnx.LoRAParam(b, out_sharding=(None, *names[n_in:]), eager_sharding=_eager()))
    module.lora_scale = lora.scale


def dense(x, w, n_in: int = 1, **kw):
    """x [..., *w.shape[:n_in]] contracted with w [*in, *out] -> [..., *out]: the tensordot over x's last n_in
    axes, written as one 2-D matmul [N, prod(in)] @ [prod(in), prod(out)] over the flattened leading axes. Every
    projection (q, k, v, o, the MLP, LoRA's adapters) and the LM head goes through it.

    The same numbers as the einsum over [B, T, d] (up to float rounding in the backward). The 2-D form is for the
    backward pass: differentiating the einsum, XLA:CPU contracted each weight gradient over (B, T) through
    transposed copies of the activations (benchmarks/README.md, section 1: the SwiGLU's
    `transpose(jvp(jit(silu)))` copies); the flattened matmul's weight gradient is one x2.T @ dy2. The DPO step
    became 1.08x faster at the tiny shape and 1.25x at the 135M shape (two rows per pair; section 8,
    `benchmarks/ab_attention.py --compare dense`). kw: jnp.matmul's (preferred_element_type)."""
    lead, out = x.shape[:x.ndim - n_in], w.shape[n_in:]
    k = math.prod(w.shape[:n_in])
    y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), **kw)
    return y.reshape(*lead, *out)


def _lora(module: nnx.Module, name: str, x, y):
    """y (= x W for projection `name`) plus the adapters' (alpha/r) (x A) B when `module` has them; else y."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return y
    b = getattr(module, f"{name}_lora_b")
    xa = dense(x, a[...].astype(y.dtype), a.ndim - 1)
    return y + dense(xa * jnp.asarray(module.lora_scale, y.dtype), b[...].astype(y.dtype))


class Norm(nnx.Module):
    """RMSNorm (llama) or LayerNorm with bias (gpt2), computed in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.rms = cfg.family == "llama"
        self.eps = float(cfg.norm_eps)
        self.dtype = DTYPES[cfg.dtype]
        self.scale = _param(None, (cfg.d_model,), ("norm",), cfg, "ones")
        if not self.rms:
            self.bias = _param(None, (cfg.d_model,), ("norm",), cfg, "zeros")

    def __call__(self, x):
        x = x.astype(jnp.float32)
        if self.rms:
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
            y = y * self.scale[...].astype(jnp.float32)
        else:
            c = x - jnp.mean(x, axis=-1, keepdims=True)
            y = c * jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + self.eps)
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [hd/2] (float32, computed as transformers does) for cfg.rope_type: "default"
    theta^(-2i/hd); "linear" those / rope_factor; "llama3" Llama-3.1's: wavelengths longer than
    rope_original_max_len / low_freq_factor divided by rope_factor, shorter than .. / high_freq_factor kept, the
    band between interpolated smoothly."""
    hd = cfg.hd
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
           ).astype(np.float32)
    if cfg.rope_type == "linear":
        return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if cfg.rope_type == "yarn":  # transformers' _compute_yarn_parameters (the attention factor is the config's)
        base, factor, dim = cfg.rope_theta, cfg.rope_factor, hd
        pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
                     ).astype(np.float32)

        def correction_dim(rotations):
            return dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = (1 - ramp).astype(np.float32)
        inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
        return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)
    return inv


def rope_tables(positions, head_dim: int, theta: float, inv_freq=None):
    """cos, sin [B, T, 1, head_dim/2] (float32) for integer positions [B, T] (inv_freq [head_dim/2]: default
    theta^(-2i/head_dim); rope_inv_freq(cfg) gives the scaled ones)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x, cos, sin):
    """HF Llama convention: the head is split into two halves, x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_mask(q_idx, n_keys: int, window: int = 0):
    """bool [T, n_keys]: query at index q_idx[t] may see key index j when j <= q_idx[t] and, with a sliding
    window W > 0, q_idx[t] - j < W (as transformers' sliding_window_overlay). Indices are sequence (or cache slot)
    indices: in a row, real tokens are contiguous, so their distance is their position distance."""
    j = jnp.arange(n_keys, dtype=jnp.int32)[None, :]
    q = jnp.asarray(q_idx, jnp.int32)[:, None]
    mask = j <= q
    if window:
        mask = mask & (q - j < window)
    return mask


def attend(q, k, v, mask):
    """Grouped-query attention. q [B,T,H,hd]; k, v [B,S,K,hd]; mask bool [B,T,S] (True = may attend).

    Scores and softmax in float32; a row with no allowed key gets a uniform (finite) distribution."""
    return _attend(q, k, v, mask, k.shape[2], "bskd", "bskd")


CAUSAL_CHUNK = 32  # query rows per chunk of attend_causal ("xla_chunked"'s training forward), at least
CAUSAL_MAX_CHUNKS = 16  # longer rows get longer chunks: a bounded number of ops per layer


def causal_chunk(t: int) -> int:
    """attend_causal's chunk for rows of t tokens: CAUSAL_CHUNK, or t / CAUSAL_MAX_CHUNKS rounded up to 8."""
    return max(CAUSAL_CHUNK, -(-t // (CAUSAL_MAX_CHUNKS * 8)) * 8)


def attend_causal(q, k, v, mask, chunk: int | None = None):
    """`attend` for self-attention under a causal mask (T == S, mask[:, t, s] False for every s > t, as every
    training forward's mask is: causal, sliding-window, padding, packed segments, a shared prompt), computed in
    chunks of `chunk` query rows, each against the keys up to its own last row only: the score matrix's blocks
    above the diagonal, masked anyway, are not computed (about half of it). The same numbers as `attend` for every
    query that sees a key, up to float rounding (each chunk's softmax sums fewer exact zeros); a query that sees no
    key (padding) gets the mean of the values up to its chunk's end instead of all (no real token reads it).
    model.attention="xla_chunked"; on the 2-core CPU: benchmarks/README.md, section 7."""
    t = q.shape[1]
    chunk = causal_chunk(t) if chunk is None else chunk
    if chunk <= 0 or t <= chunk:
        return attend(q, k, v, mask)
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end]))
    return jnp.concatenate(outs, axis=1)


def attend_cache(q, k_cache, v_cache, mask):
    """`attend` over a KV cache in its own layout (Transformer.init_cache): q [B,T,H,hd]; k_cache [B,K,S,hd];
    v_cache [B,K,hd,S]; mask bool [B,T,S]. The same numbers as attend(q, k, v, mask) on the [B,S,K,hd] k and v."""
    return _attend(q, k_cache, v_cache, mask, k_cache.shape[1], "bksd", "bkds")


def _attend(q, k, v, mask, kv: int, k_axes: str, v_axes: str):
    """attend's computation for k, v laid out as k_axes / v_axes (einsum letters: b batch, s slot, k kv head, d
    head dim), kv key-value heads."""
    b, t, h, hd = q.shape
    q = q.reshape(b, t, kv, h // kv, hd)
    s = jnp.einsum(f"btkgd,{k_axes}->bkgts", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
    s = jnp.where(mask[:, None, None], s, NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum(f"bkgts,{v_axes}->btkgd", p, v).reshape(b, t, h, hd)


class SelfMask(NamedTuple):
    """What a training forward (queries = keys, T == S) masks beside causality and the sliding window, for the
    "dot_product_attention" and "splash" implementations: key_mask bool [B,T] (False = padding key), segment_ids
    int32 [B,T] (packed rows) and shared_keys bool [B,T] (keys every segment sees: a prompt shared by the branches
    after it), each None when absent."""
    key_mask: Any = None
    segment_ids: Any = None
    shared_keys: Any = None


def attend_dot_product(q, k, v, mask=None, *, causal: bool = False, window: int = 0):
    """`jax.nn.dot_product_attention` (grouped-query: k, v may have fewer heads). q [B,T,H,hd]; k, v [B,S,K,hd];
    mask bool broadcastable to [B,H,T,S] or None; causal: query t sees keys <= t (T == S); window W > 0: and keys
    > t - W. implementation=None: in jax 0.10.2 the XLA implementation (module doc)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        local_window_size=(window - 1, 0) if window else None, implementation=None)


def _self_mask_dense(m: SelfMask):
    """bool [B,1,T|1,T] from a SelfMask's padding keys, segments and shared keys, or None when it has neither keys
    nor segments: what a token may see beside causality and the window (the xla and dot_product_attention paths)."""
    mask = None
    if m.key_mask is not None:
        mask = m.key_mask.astype(bool)[:, None, None, :]
    if m.segment_ids is not None:
        same = m.segment_ids[:, None, :, None] == m.segment_ids[:, None, None, :]
        if m.shared_keys is not None:
            same = same | m.shared_keys.astype(bool)[:, None, None, :]
        mask = same if mask is None else mask & same
    return mask


_LOGGED: set = set()


def _log_once(msg: str, *args) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logging.warning(msg, *args)


def splash_block(t: int) -> int:
    """The splash kernel's tile for a sequence of t tokens: the largest of 512, 256, 128 that divides it."""
    return next(b for b in (512, 256, SPLASH_BLOCK) if t % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, t: int, window: int, interpret: bool):
    """The splash MHA kernel (grouped-query: k, v may have fewer heads) for `heads` query heads over a sequence of
    t, causal or (window > 0) sliding-window; its block map is computed here, once per shape."""
    base = (splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0) if window
            else splash.CausalMask((t, t)))
    b = splash_block(t)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():  # concrete block maps (constants of any program), never a trace's tracers
        return splash.make_splash_mha(splash.MultiHeadMask([base] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, q_seg=None, kv_seg=None, *, window: int, interpret: bool):
    """The kernel on one device's rows: q [b,T,h,hd], k, v [b,T,kv,hd] -> [b,T,h,hd]; q_seg, kv_seg int32 [b,T]."""
    t, h, hd = q.shape[1], q.shape[2], q.shape[3]
    kernel = _splash_kernel(h, t, window, interpret)
    q = q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)  # the kernel does not scale the scores
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [b, heads, T, hd]
    if q_seg is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(q=qs, kv=ks)))(
            q, k, v, q_seg, kv_seg)
    return jnp.swapaxes(out, 1, 2)


def check_splash_shape(t: int) -> None:
    """ConfigError unless the splash kernel can take a sequence of t tokens."""
    if t % SPLASH_BLOCK:
        raise ConfigError(f"config.model.attention = 'splash' with a sequence of {t} tokens: expected a multiple of "
                          f"{SPLASH_BLOCK} (the splash kernel's block); set data.buckets (and data.max_len, "
                          f"compile.seq_len) to multiples of {SPLASH_BLOCK}, or model.attention='xla'")


def attend_splash(q, k, v, m: SelfMask, window: int = 0):
    """Causal (or sliding-window) self-attention through the splash kernel. q [B,T,H,hd]; k, v [B,T,K,hd]; m: the
    padding keys and packed segments, turned into SegmentIds (a query of segment s sees keys of segment s that are
    not padding: q ids 2s, kv ids 2s, or 2s + 1 for a padding key, which no query has).

    Under a mesh (shard_activations', else the ambient one) the kernel runs per device in `jax.shard_map`: rows split
    over the batch axes that divide B, heads over `tensor` when it divides both H and K (otherwise every `tensor`
    device computes all heads). Interpret mode unless the mesh's devices (else the default backend) are TPUs."""
    b, t, h, _ = q.shape
    kv = k.shape[2]
    check_splash_shape(t)
    segs = ()
    if m.key_mask is not None or m.segment_ids is not None:
        seg = (jnp.zeros((b, t), jnp.int32) if m.segment_ids is None else m.segment_ids.astype(jnp.int32)) * 2
        pad = 0 if m.key_mask is None else jnp.logical_not(m.key_mask.astype(bool)).astype(jnp.int32)
        segs = (seg, seg + pad)
    ctx = _ACTIVATION_SHARDING.get()
    mesh, batch_axes = ctx if ctx is not None else (jax.sharding.get_abstract_mesh(), ("data", "fsdp"))
    concrete = isinstance(mesh, jax.sharding.Mesh) and mesh.size
    platform = mesh.devices.flat[0].platform if concrete else jax.default_backend()
    interpret = platform != "tpu"
    if interpret:
        _log_once("model.attention='splash' on %s: the Pallas kernel runs in interpret mode (the same numbers as on "
                  "TPU, many times slower than model.attention='xla')", platform)
    fn = functools.partial(_splash_local, window=window, interpret=interpret)
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, *segs)
    P = jax.sharding.PartitionSpec
    rows = tuple(a for a in batch_axes if a in mesh.axis_names)
    if not rows or b % math.prod(mesh.shape[a] for a in rows):
        rows = None
    n_tensor = mesh.shape["tensor"] if "tensor" in mesh.axis_names else 1
    heads = "tensor" if n_tensor > 1 and h % n_tensor == 0 and kv % n_tensor == 0 else None
    if n_tensor > 1 and heads is None:
        _log_once("model.attention='splash': %d query / %d key-value heads do not split over tensor=%d: every tensor "
                  "device computes all heads", h, kv, n_tensor)
    x_spec, seg_spec = P(rows, None, heads, None), P(rows, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec,) * 3 + (seg_spec,) * len(segs), out_specs=x_spec,
                         check_vma=False)(q, k, v, *segs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.dtype = DTYPES[cfg.dtype]
        self.q = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        self.k = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.v = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.o = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg,
                        std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        gpt2 = cfg.family == "gpt2"
        self.has_bias = gpt2 or cfg.qkv_bias  # q, k, v biases
        self.has_o_bias = gpt2 or cfg.o_bias
        if self.has_bias:
            self.q_bias = _param(None, (h, hd), ("heads", "head_dim"), cfg, "zeros")
            self.k_bias = _param(None, (kv, hd), ("kv_heads", "head_dim"), cfg, "zeros")
            self.v_bias = _param(None, (kv, hd), ("kv_heads", "head_dim"), cfg, "zeros")
        if self.has_o_bias:
            self.o_bias = _param(None, (d,), ("norm",), cfg, "zeros")
        self.qk_norm_eps = float(cfg.norm_eps) if cfg.qk_norm else 0.0
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim of every q and k head, one scale shared by the heads
            self.q_norm = _param(None, (hd,), ("head_dim",), cfg, "ones")
            self.k_norm = _param(None, (hd,), ("head_dim",), cfg, "ones")

    def _head_norm(self, x, scale):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.qk_norm_eps)
        return (y * scale[...].astype(jnp.float32)).astype(x.dtype)

    def qkv(self, x, rope):
        proj = lambda n: _lora(self, n, x, dense(x, getattr(self, n)[...].astype(self.dtype)))  # noqa: E731
        q, k, v = proj("q"), proj("k"), proj("v")
        if self.has_bias:
            q = q + self.q_bias[...].astype(self.dtype)
            k = k + self.k_bias[...].astype(self.dtype)
            v = v + self.v_bias[...].astype(self.dtype)
        if self.qk_norm_eps:
            q, k = self._head_norm(q, self.q_norm), self._head_norm(k, self.k_norm)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def out(self, a):
        y = _lora(self, "o", a, dense(a, self.o[...].astype(self.dtype), 2))
        if self.has_o_bias:
            y = y + self.o_bias[...].astype(self.dtype)
        return y


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.dtype = DTYPES[cfg.dtype]
        self.gated = cfg.family == "llama"
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.has_bias = self.gated and cfg.mlp_bias
        if self.gated:
            self.gate = _param(rngs, (d, f), ("embed", "mlp"), cfg)
            self.up = _param(rngs, (d, f), ("embed", "mlp"), cfg)
            self.down = _param(rngs, (f, d), ("mlp", "embed"), cfg, std=out_std)
            if self.has_bias:  # Llama mlp_bias
                self.gate_bias = _param(None, (f,), ("mlp",), cfg, "zeros")
                self.up_bias = _param(None, (f,), ("mlp",), cfg, "zeros")
                self.down_bias = _param(None, (d,), ("norm",), cfg, "zeros")
        else:
            self.fc = _param(rngs, (d, f), ("embed", "mlp"), cfg)
            self.fc_bias = _param(None, (f,), ("mlp",), cfg, "zeros")
            self.proj = _param(rngs, (f, d), ("mlp", "embed"), cfg, std=out_std)
            self.proj_bias = _param(None, (d,), ("norm",), cfg, "zeros")

    def __call__(self, x):
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        mm = lambda h, n: _lora(self, n, h, dense(h, w(getattr(self, n))))  # noqa: E731
        if self.gated and self.has_bias:
            hmid = jax.nn.silu(mm(x, "gate") + w(self.gate_bias)) * (mm(x, "up") + w(self.up_bias))
            return mm(hmid, "down") + w(self.down_bias)
        if self.gated:
            return mm(jax.nn.silu(mm(x, "gate")) * mm(x, "up"), "down")
        hmid = jax.nn.gelu(mm(x, "fc") + w(self.fc_bias), approximate=True)
        return mm(hmid, "proj") + w(self.proj_bias)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.attention, self.window = cfg.attention, cfg.sliding_window

    def __call__(self, x, rope, mask, cache=None, cache_index=None):
        """-> (x, new_cache). With a cache, this step's k/v are written at slots cache_index.. and attention
        runs over every cache slot (mask [B,T,S] selects the visible ones). mask: bool [B,T,S] (xla, and every
        decode path), or a SelfMask (the training forward of dot_product_attention and splash)."""
        q, k, v = self.attn.qkv(self.attn_norm(x), rope)
        if cache is not None:  # the cache's layout (Transformer.init_cache): k [B,K,S,hd], v [B,K,hd,S]
            i, zero = jnp.asarray(cache_index, jnp.int32), jnp.int32(0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.transpose(0, 2, 1, 3).astype(cache["k"].dtype),
                                                       (zero, zero, i, zero)),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v.transpose(0, 2, 3, 1).astype(cache["v"].dtype),
                                                       (zero, zero, zero, i))}
            if self.attention == "dot_product_attention":  # the decode path: the whole [B,T,S] mask, [B,S,K,hd]
                a = attend_dot_product(q, cache["k"].transpose(0, 2, 1, 3), cache["v"].transpose(0, 3, 1, 2),
                                       mask[:, None])
            else:  # xla; splash's decode path
                a = attend_cache(q, cache["k"], cache["v"], mask)
        elif isinstance(mask, SelfMask) and self.attention == "splash":
            a = attend_splash(q, k, v, mask, self.window)
        elif isinstance(mask, SelfMask):
            a = attend_dot_product(q, k, v, _self_mask_dense(mask), causal=True, window=self.window)
        elif self.attention == "xla_chunked":  # a training forward's causal self-attention
            a = attend_causal(q, k, v, mask)
        else:  # xla
            a = attend(q, k, v, mask)
        x = x + self.attn.out(a)
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


def _block_forward(block: Block, x, rope, mask):
    return block(x, rope, mask)[0]


# (mesh, batch mesh axes) while a train/eval step is traced (train.py), else None
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar("pal_activation_sharding", default=None)


@contextlib.contextmanager
def shard_activations(mesh, batch_axes=("data", "fsdp")):
    """Code traced inside keeps the residual stream and the logits split over `batch_axes` of `mesh` (rows), as
    the batch is. Without it XLA's propagation from params sharded on `embed` may gather activations over the
    batch: on a 32-chip fsdp mesh the llama3_8b step needed 540 GiB of temporaries per chip (pal_jax/training/aot.py)."""
    token = _ACTIVATION_SHARDING.set((mesh, tuple(batch_axes)))
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def _constrain_rows(x):
    spec = _ACTIVATION_SHARDING.get()
    if spec is None:
        return x
    mesh, axes = spec
    P = jax.sharding.PartitionSpec
    return jax.lax.with_sharding_constraint(  # rows split; the other dims as XLA sees fit (e.g. vocab on tensor)
        x, jax.sharding.NamedSharding(mesh, P(axes, *([P.UNCONSTRAINED] * (x.ndim - 1)))))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), cfg)
        if cfg.family == "gpt2":
            self.pos_embed = _param(rngs, (cfg.max_len, cfg.d_model), ("pos", "embed"), cfg, std=0.01)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), cfg)
        if lora is not None:  # after every base param: the base draws the same random numbers as without LoRA
            lora.check_family(cfg.family)
            n_in = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1, "fc": 1, "proj": 1}
            for block in self.blocks:
                for name in lora.targets:
                    module = block.attn if name in ("q", "k", "v", "o") else block.mlp
                    _add_adapters(module, name, n_in[name], lora, cfg, rngs)

    # -- pieces ---------------------------------------------------------------------------------------------
    def _embed(self, tokens, positions):
        dtype = DTYPES[self.cfg.dtype]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        if self.cfg.family == "gpt2":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dtype)
        return x

    def _rope(self, positions):
        if self.cfg.family != "llama":
            return None
        scaled = rope_inv_freq(self.cfg) if self.cfg.rope_type != "default" else None
        cos, sin = rope_tables(positions, self.cfg.hd, self.cfg.rope_theta, scaled)
        if self.cfg.rope_attention_factor != 1.0:  # yarn
            cos, sin = cos * self.cfg.rope_attention_factor, sin * self.cfg.rope_attention_factor
        return cos, sin

    def _check_positions(self, n: int, what: str) -> None:
        """gpt2 has a learned table of max_len positions: a longer sequence would read past it (NaN logits)."""
        if self.cfg.family == "gpt2" and n > self.cfg.max_len:
            raise ValueError(f"gpt2 model: {what} of {n} tokens; expected at most max_len={self.cfg.max_len} (the "
                             f"learned position table, HF n_positions): shorten the prompt or max_new_tokens")

    @staticmethod
    def _positions(tokens, positions):
        if positions is None:
            return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return positions

    # -- public API -----------------------------------------------------------------------------------------
    def hidden_states(self, tokens, *, positions=None, key_mask=None, segment_ids=None, shared_keys=None):
        """tokens int32 [B,T] -> final-normed hidden states [B,T,d_model] (cfg.dtype).

        positions int32 [B,T] (default arange); key_mask bool [B,T] (False = padding key, never attended);
        segment_ids int32 [B,T] (packed rows, data.packing): a token attends only to earlier tokens of its own
        segment (give each example's positions restarting at 0). shared_keys bool [B,T] (with segment_ids): keys
        every later token sees whatever its segment, i.e. a prompt shared by the branches that follow it in the row
        (stage2.share_prompt: [prompt | chosen | rejected], each branch's positions continuing the prompt's); not
        with splash (its SegmentIds cannot express it) nor a sliding window (which counts row indices, not
        positions): ConfigError. Attention through cfg.attention (module doc); splash needs T a multiple of
        SPLASH_BLOCK (ConfigError otherwise)."""
        self._check_positions(tokens.shape[1], "a sequence")
        positions = self._positions(tokens, positions)
        t = tokens.shape[1]
        if shared_keys is not None and (self.cfg.attention == "splash" or self.cfg.sliding_window
                                        or segment_ids is None):
            raise ConfigError(
                f"a shared prompt (stage2.share_prompt) with model.attention={self.cfg.attention!r}, "
                f"model.sliding_window={self.cfg.sliding_window}, segment_ids {'absent' if segment_ids is None else 'given'}: "
                f"expected attention 'xla', 'xla_chunked' or 'dot_product_attention', no sliding window, and "
                f"segment ids; set --config.stage2.share_prompt=False")
        if self.cfg.attention in ("xla", "xla_chunked"):
            mask = causal_mask(jnp.arange(t, dtype=jnp.int32), t, self.cfg.sliding_window)[None]
            keys = _self_mask_dense(SelfMask(key_mask, segment_ids, shared_keys))  # [B,1,T|1,T] or None
            if keys is not None:
                mask = mask & keys[:, 0]
            mask = jnp.broadcast_to(mask, (tokens.shape[0], t, t))
        else:  # causality and the window are the implementation's own (module doc)
            mask = SelfMask(key_mask, segment_ids, shared_keys)
        x = self._embed(tokens, positions)
        rope = self._rope(positions)
        run = nnx.remat(_block_forward) if self.cfg.remat else _block_forward
        x = _constrain_rows(x)
        for block in self.blocks:
            x = _constrain_rows(run(block, x, rope, mask))
        return self.final_norm(x)

    def logits(self, hidden):
        """The LM head: float32 logits [..., vocab_size] (padded vocab entries sliced off)."""
        dtype = DTYPES[self.cfg.dtype]
        h = hidden.astype(dtype)
        w = self.embed[...].astype(dtype).T if self.cfg.tie_embeddings else self.head[...].astype(dtype)
        out = dense(h, w, preferred_element_type=jnp.float32)
        if self.cfg.padded_vocab != self.cfg.vocab_size:
            out = out[..., : self.cfg.vocab_size]
        return _constrain_rows(out.astype(jnp.float32))

    def __call__(self, tokens, *, positions=None, key_mask=None, segment_ids=None):
        """tokens int32 [B,T] -> (logits float32 [B,T,vocab_size], final-normed hidden [B,T,d_model])."""
        hidden = self.hidden_states(tokens, positions=positions, key_mask=key_mask, segment_ids=segment_ids)
        return self.logits(hidden), hidden

    def init_cache(self, batch: int, max_len: int) -> list[dict[str, jax.Array]]:
        """Zeroed KV cache: one {"k", "v"} dict per layer, k [batch, n_kv_heads, max_len, head_dim] and v
        [batch, n_kv_heads, head_dim, max_len]: the layouts in which XLA:CPU's two attention products (scores, then
        values) read them, so that no decoding step transposes the whole cache. With
        [batch, max_len, n_kv_heads, head_dim] for both, XLA:CPU copied every layer's k and v into these layouts at
        every step (benchmarks/README.md, "Profile")."""
        k_shape = (batch, self.cfg.n_kv_heads, max_len, self.cfg.hd)
        v_shape = (batch, self.cfg.n_kv_heads, self.cfg.hd, max_len)
        dtype = DTYPES[self.cfg.dtype]
        return [{"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype)} for _ in range(self.cfg.n_layers)]

    def decode(self, tokens, cache, *, positions, cache_index, key_mask, last_only: bool = False):
        """Run tokens [B,T] against a KV cache. Pure: returns (logits [B,T,V] f32, hidden [B,T,D], new_cache).

        last_only: the LM head runs on the last position only (logits [B,1,V]), as a prefill needs: a prompt's
        other positions' logits are never read, and the head is the largest matmul of a small model's prefill
        (SmolLM2-135M: 49152 x 576 per position; XLA does not push the slice through the dot by itself).

        The tokens' keys/values go into cache slots cache_index..cache_index+T-1 (cache_index: int32 scalar, may be
        traced); query t (slot cache_index+t) attends to slots s <= cache_index+t where key_mask [B,S] is True.
        positions [B,T] are the tokens' position ids (RoPE angle / gpt2 table row). Attention: cfg.attention's,
        except that splash (a self-attention kernel) and xla_chunked (a causal self-attention) use "xla" here."""
        b, t = tokens.shape
        s = cache[0]["k"].shape[2]  # slots (init_cache's layout)
        self._check_positions(s, "a KV cache (prompt + new tokens)")
        q_slot = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        mask = causal_mask(q_slot, s, self.cfg.sliding_window)  # [T,S]
        mask = mask[None] & key_mask[:, None, :].astype(bool)  # [B,T,S]
        x = self._embed(tokens, positions)
        rope = self._rope(positions)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, rope, mask, layer_cache, cache_index)
            new_cache.append(layer_cache)
        hidden = self.final_norm(x)
        return self.logits(hidden[:, -1:] if last_only else hidden), hidden, new_cache
