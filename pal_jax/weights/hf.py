"""Hugging Face checkpoints (config.json + safetensors) in and out of pal_jax models.

Supported model_type: "gpt2" (GPT2LMHeadModel), "llama" (LlamaForCausalLM and compatible, e.g. SmolLM2; with
attention_bias, mlp_bias, linear or llama3 RoPE scaling), "qwen2" (Qwen2/Qwen2.5), "qwen3" and "mistral": one key
table and config translation per family in pal_jax/weights/families.py, walked here in both directions.
Layouts: GPT-2 stores Conv1D weights as [in, out] with q/k/v fused in c_attn; Llama stores nn.Linear weights as
[out, in]. Both are reshaped into the model's [embed, heads, head_dim] / [heads, head_dim, embed] kernels, after
each tensor's stored shape is checked against the config (a transposed or misshapen tensor is named).
No torch, no pickle and no remote code: tensors are read and written with safetensors' numpy functions, and a
directory holding only pytorch_model.bin (a pickle) is refused.

Import: `load_hf_dir(path)` (model.safetensors, or shards listed in model.safetensors.index.json).
Export: `export_hf_dir(model_or_params, cfg, out_dir, tokenizer)` writes config.json, generation_config.json,
model.safetensors (float32, the vocab cut back from the padded `vocab_multiple` rows to `vocab_size`) and the
tokenizer files, into a temporary directory renamed to `out_dir` when complete (a pal_jax checkpoint's export:
pal_jax/weights/export.py). `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads the result.
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

from pal_jax.model.transformer import ModelConfig, Transformer
from pal_jax.weights import families as hf_families


SUPPORTED = hf_families.SUPPORTED
# Buffers some checkpoints carry that are not parameters (GPT-2 causal-mask buffers, cached RoPE frequencies).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def model_config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """HF config.json dict -> ModelConfig. `overrides` (e.g. dtype, vocab_multiple, max_len) replace fields."""
    fields = hf_families.fields_from_hf(hf_config)
    fields.update(overrides)
    return ModelConfig.from_dict(fields)


def _param_at(model: Transformer, path: str) -> nnx.Param:
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _layer_names(key: hf_families.Key, cfg: ModelConfig):
    """(HF name, param paths) of `key` for every layer (or once when it is not per layer)."""
    if "{i}" not in key.hf:
        return [(key.hf, key.params)]
    return [(key.hf.format(i=i), tuple(p.format(i=i) for p in key.params)) for i in range(cfg.n_layers)]


def _lookup(tensors: Mapping[str, np.ndarray], name: str) -> str | None:
    """The stored name of HF tensor `name`: itself, or without its "model." / "transformer." prefix (a checkpoint
    of the base model, without the LM head wrapper)."""
    if name in tensors:
        return name
    short = name.split(".", 1)[1] if name.startswith(("model.", "transformer.")) else None
    return short if short is not None and short in tensors else None


def load_hf_state_dict(model: Transformer, tensors: dict[str, np.ndarray]) -> None:
    """Copy HF tensors into the model's params in place, by the family's key table (pal_jax/weights/families.py).

    Every tensor's stored shape is checked before any reshape or transpose; a missing, misshapen or unexpected
    tensor is a ValueError naming it (and the expected shape). Works on a concrete model or on one from
    nnx.eval_shape (its abstract params become arrays)."""
    cfg = model.cfg
    used: set[str] = set()
    for key in hf_families.key_table(cfg):
        for name, paths in _layer_names(key, cfg):
            stored = _lookup(tensors, name)
            if not key.present(cfg):
                if stored is not None and key.params != ("head",):  # a tied checkpoint may also store the head
                    raise ValueError(f"HF checkpoint: tensor {stored!r} is present but the config says this "
                                     f"{cfg.family} model has none (check attention_bias / mlp_bias / the "
                                     f"model_type); expected the checkpoint to match its config")
                if stored is not None:
                    used.add(stored)
                continue
            if stored is None:
                raise ValueError(f"HF checkpoint: tensor {name!r} not found ({len(tensors)} tensors present); "
                                 f"expected it for this model config")
            used.add(stored)
            params = [_param_at(model, p) for p in paths]
            shapes = [tuple(p.shape) for p in params]
            want = hf_families.expected_hf_shape(key, shapes, cfg)
            w = tensors[stored]
            if tuple(w.shape) != want:
                hint = " (it looks transposed)" if tuple(w.shape) == want[::-1] and len(want) == 2 else ""
                raise ValueError(f"HF checkpoint: tensor {stored!r} has shape {tuple(w.shape)}{hint}; expected "
                                 f"{want} for this model config")
            to_param = hf_families.LAYOUTS[key.layout][1]
            for param, shape, part in zip(params, shapes, hf_families.split_fused(np.asarray(w), key, shapes, cfg)):
                value = to_param(part, shape, cfg)
                param.set_value(jnp.asarray(np.asarray(value).astype(np.float32), dtype=param.dtype))
    unused = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
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
    """All tensors of one .safetensors file; an unreadable file (e.g. truncated) is a ValueError naming it."""
    from safetensors.numpy import load_file
    path = pathlib.Path(path)
    try:
        try:
            return load_file(str(path))
        except TypeError:  # e.g. "data type 'bfloat16' not understood"
            return _read_safetensors_raw(path)
    except (OSError, ValueError, TypeError, KeyError, struct.error, Exception) as e:
        if isinstance(e, FileNotFoundError):
            raise
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path}: cannot read this safetensors file ({size} bytes): {e}; expected a complete "
                         f"safetensors file (a truncated download? fetch it again)") from e


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


def hf_config_dict(cfg: ModelConfig, tokenizer=None) -> dict:
    """ModelConfig -> an HF config.json dict (the family chosen by hf_families.hf_family: gpt2, llama, qwen2,
    qwen3 or mistral) that transformers and model_config_from_hf read back to the same model. Token ids come from
    `tokenizer` (pal_jax.model.tokenizer.Tokenizer) when given."""
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    model_type, arch, family_keys = hf_families.hf_family(cfg)
    return {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "dtype": "float32",
            "use_cache": True, "initializer_range": 0.02, **ids, **family_keys}


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
    """pal_jax params -> HF tensors (float32 numpy, the names and layouts of the family's key table).

    The embedding rows / head columns past cfg.vocab_size (padding to vocab_multiple) are cut off."""
    params = _pure_params(model_or_params)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param))

    def get(path: str):
        node, want = params, abstract
        parts = [int(k) if k.isdigit() else k for k in path.split(".")]
        for i, k in enumerate(parts):
            want = want[k]
            if isinstance(node, Mapping) and k not in node and isinstance(k, int) and str(k) in node:
                k = str(k)  # some restorers give list indices as strings
            if not isinstance(node, Mapping) or k not in node:
                raise ValueError(f"export: param {'/'.join(map(str, parts[:i + 1]))} not found; expected the params "
                                 f"of a {cfg.family} model with n_layers={cfg.n_layers}")
            node = node[k]
        if tuple(node.shape) != tuple(want.shape):
            raise ValueError(f"export: param {'/'.join(map(str, parts))} has shape {tuple(node.shape)}; expected "
                             f"{tuple(want.shape)} for the given model config")
        return _host(node)

    out: dict[str, np.ndarray] = {}
    for key in hf_families.key_table(cfg):
        if not key.present(cfg):  # tied: transformers ties lm_head to the embedding and the file holds no copy
            continue
        to_hf = hf_families.LAYOUTS[key.layout][2]
        for name, paths in _layer_names(key, cfg):
            parts = [to_hf(get(p), cfg) for p in paths]
            out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
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
    a pure dict of them (e.g. from checkpoint.load_params). tokenizer: a pal_jax.model.tokenizer.Tokenizer, saved beside
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
    hf_cfg = hf_config_dict(model_cfg, tokenizer)  # first: a config no HF family holds is refused here
    tensors = hf_state_dict(model_or_params, model_cfg)
    if jax.process_index() != 0:
        return str(out)
    from safetensors.numpy import save_file
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


