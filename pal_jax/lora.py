"""LoRA: low-rank adapters trained on a frozen base, and merged back into the base for inference and export.

    --config.lora.rank=8 [--config.lora.alpha=16 --config.lora.targets=q,k,v,o,gate,up,down]

model.py adds the adapters (`nnx.LoRAParam` A [in..., r] and B [r, out...], B zero at init) to the targeted
projections; train.ModelState then treats the adapters as the trainable params (optimizer state, checkpoints) and
the base as `frozen`, an argument of every train step that is never donated, differentiated or checkpointed.

Params are pure dicts. An adapter is a leaf whose key ends in `_lora_a` / `_lora_b`; `split` separates a tree into
(adapters, base) and `combine` joins them back into one tree of the same arrays (no copy).

Where the base comes from. A LoRA checkpoint holds only adapters; its base is found from its saved config:
- init_from is a LoRA checkpoint with the same adapters (rank, alpha, targets): the run continued those adapters
  (Stage 2 after a LoRA Stage 1), so the base is that checkpoint's base, found the same way;
- otherwise the base is init_from's full params (a LoRA checkpoint of another shape is merged first), or the random
  init of the run's seed when init_from is "".
A relative init_from path is resolved against the current directory, as in the run that saved it.

Stage 2 with LoRA: the policy is the base + trainable adapters starting from Stage 1's; the reference is
`combine(base, stage-1 adapters)`: the same base arrays, so only the small adapter trees are held twice
(stage2.reference=base: `combine(base, all-zero adapters)`, exactly the base model; pal_jax/stage2.py).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pal_jax import checkpoint as ckpt_lib
from pal_jax.model import LoraConfig

SUFFIXES = ("_lora_a", "_lora_b")


# -- config ------------------------------------------------------------------------------------------------------

def parse_targets(targets) -> tuple[str, ...]:
    """Comma-separated names "q,k,v" (or a list) -> ("q", "k", "v")."""
    if isinstance(targets, str):
        targets = targets.split(",")
    return tuple(t.strip() for t in targets if t.strip())


def lora_config(config) -> LoraConfig | None:
    """config.lora (a ConfigDict, or the dict of a checkpoint's saved config) -> a LoraConfig, or None when
    rank is 0 or the section is absent (configs saved before LoRA existed)."""
    section = config.get("lora") if hasattr(config, "get") else None
    if not section or int(section.get("rank", 0)) == 0:
        return None
    return LoraConfig(rank=int(section["rank"]), alpha=float(section["alpha"]),
                      targets=parse_targets(section["targets"]))


# -- trees ---------------------------------------------------------------------------------------------------------

def is_adapter(key) -> bool:
    return isinstance(key, str) and key.endswith(SUFFIXES)


def split(tree: Mapping) -> tuple[dict, dict]:
    """A params tree (nested dicts) -> (adapters, base): the `*_lora_a/b` leaves, and every other leaf."""
    adapters, base = {}, {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            a, b = split(v)
            if a:
                adapters[k] = a
            if b:
                base[k] = b
        elif is_adapter(k):
            adapters[k] = v
        else:
            base[k] = v
    return adapters, base


def combine(base: Mapping, adapters: Mapping) -> dict:
    """One tree holding the leaves of both (the same array objects: nothing is copied)."""
    out = dict(base)
    for k, v in adapters.items():
        if isinstance(v, Mapping):
            out[k] = combine(base.get(k, {}), v)
        elif k in out:
            raise ValueError(f"lora.combine: key {k!r} is in both trees; expected the adapters apart from the base")
        else:
            out[k] = v
    return out


def merge_adapters(tree: Mapping, lora: LoraConfig) -> dict:
    """One tree of base + adapters -> the plain model's params: W + (alpha/r) A B for each adapted projection W
    (computed in float32, stored in W's dtype). Works on jax arrays (traceable) and on numpy arrays."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out[k] = merge_adapters(v, lora)
        elif not is_adapter(k):
            a, b = tree.get(f"{k}_lora_a"), tree.get(f"{k}_lora_b")
            if a is None:
                out[k] = v
            else:
                xp = np if isinstance(v, np.ndarray) else jnp
                f32 = lambda x: xp.asarray(x, dtype=xp.float32)  # noqa: E731
                delta = xp.tensordot(f32(a), f32(b), axes=1) * np.float32(lora.scale)
                out[k] = (f32(v) + delta).astype(v.dtype)
    return out


def tree_bytes(tree) -> int:
    """Bytes of the leaves of a tree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# -- loading -------------------------------------------------------------------------------------------------------

def _saved_config(path: str) -> dict:
    return ckpt_lib.load_meta(path).get("config") or {}


def _is_checkpoint(spec: str) -> bool:
    return bool(spec) and ckpt_lib.Checkpointer.exists(spec)


def checkpoint_lora(path: str) -> LoraConfig | None:
    """The LoRA config a checkpoint was trained with (None: a full-params checkpoint)."""
    return lora_config(_saved_config(path))


def base_params(spec: str, ms, seed: int):
    """The frozen base for a LoRA train.ModelState `ms` whose run has init_from `spec` and `seed` (module doc)."""
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


def checkpoint_params(path: str, ms):
    """Full params of the checkpoint at `path` for the plain train.ModelState `ms` (no LoRA): a LoRA checkpoint's
    adapters are merged into its base (module doc), a full checkpoint is loaded as it is."""
    from pal_jax import train
    lora = checkpoint_lora(path)
    if lora is None:
        params, step = ckpt_lib.load_params(path, ms.abstract)
        return params
    lms = train.ModelState(ms.cfg, ms.mesh, ms.rules, lora=lora)
    saved = _saved_config(path)
    base = base_params(saved.get("init_from", ""), lms, int(saved.get("seed", 0)))
    adapters, step = ckpt_lib.load_params(path, lms.abstract)
    merged = jax.jit(lambda b, a: merge_adapters(combine(b, a), lora), out_shardings=ms.shardings,
                     donate_argnums=0)(base, adapters)  # in place of the base: no second copy
    logging.info("lora: %s step %d: rank-%d adapters merged into the base", path, step, lora.rank)
    return merged


def full_params(spec: str, ms):
    """Params of any init_from value for the plain train.ModelState `ms`, or None for "" (random init)."""
    from pal_jax import pretrained
    if _is_checkpoint(spec):
        return checkpoint_params(spec, ms)
    return pretrained.load(spec, ms)


# -- memory ----------------------------------------------------------------------------------------------------------

def stage2_bytes(ms, tx) -> dict[str, int]:
    """Bytes a Stage 2 run holds on its devices (whole model, all devices together) for the params, the optimizer
    state and the frozen reference, from abstract shapes (jax.eval_shape: nothing is allocated).

    Without LoRA: policy params + optimizer state + the reference (a second full copy of the params). With LoRA:
    the base (shared by policy and reference) + the policy adapters + their optimizer state + the reference's
    adapters. Activations and the batch are not counted."""
    opt = jax.eval_shape(tx.init, ms.abstract)
    out = {"trainable_params": tree_bytes(ms.abstract), "optimizer_state": tree_bytes(opt),
           "frozen_base": tree_bytes(ms.frozen_abstract) if ms.lora is not None else 0,
           "reference": tree_bytes(ms.abstract)}  # a full copy of the params, or the Stage 1 adapters
    out["total"] = sum(out.values())
    return out
