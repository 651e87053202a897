"""LoRA: low-rank adapters trained on a frozen base, and merged back into the base for inference and export.

    --config.lora.rank=8 [--config.lora.alpha=16 --config.lora.targets=q,k,v,o,gate,up,down]

model.py adds the adapters (`nnx.LoRAParam` A [in..., r] and B [r, out...], B zero at init) to the targeted
projections; model.spec.ModelSpec then treats the adapters as the trainable params (optimizer state, checkpoints) and
the base as `frozen`, an argument of every train step that is never donated, differentiated or checkpointed.

Params are pure dicts. An adapter is a leaf whose key ends in `_lora_a` / `_lora_b`; `split` separates a tree into
(adapters, base) and `combine` joins them back into one tree of the same arrays (no copy).

Where a LoRA run's base comes from, and how a LoRA checkpoint is loaded: pal_jax/weights/init_from.py.

Stage 2 with LoRA: the policy is the base + trainable adapters starting from Stage 1's; the reference is
`combine(base, stage-1 adapters)`: the same base arrays, so only the small adapter trees are held twice
(stage2.reference=base: `combine(base, all-zero adapters)`, exactly the base model; pal_jax/training/stage2.py).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pal_jax.model.transformer import LoraConfig

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
