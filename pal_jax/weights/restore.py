"""Loading a pal_jax workdir into a model: the one place that reads a checkpoint's metadata, finds its tokenizer,
builds its model spec from the saved config and loads (with LoRA: merges) its params. Predict, evaluate, chat,
make_pairs (through inference.predictor) and export all load through `restore`."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.model import tokenizer as tok_lib
from pal_jax.model.spec import ModelSpec, model_config
from pal_jax.weights import init_from
from pal_jax.weights.tokenizers import checkpoint_tokenizer


@dataclasses.dataclass
class Restored:
    """A checkpoint loaded onto a mesh: its model spec (spec.cfg: the model config), full params (a LoRA
    checkpoint's adapters merged into its base), tokenizer (None: none found), step, and its metadata (the saved
    config, the task name)."""
    spec: ModelSpec
    params: Any
    tokenizer: tok_lib.Tokenizer | None
    step: int
    meta: dict


def restore(workdir: str, mesh, rules=None, tokenizer_path: str = "", need_tokenizer: bool = True,
            attention: str = "xla") -> Restored:
    """The latest checkpoint of a pal_jax workdir (or checkpoints dir) on `mesh` with the logical axis `rules`
    (None: the ones the checkpoint was trained with).

    The model shape comes from the checkpoint's saved config (vocab_size 0 = the tokenizer's); the metadata is read
    once. need_tokenizer=False allows a checkpoint without a tokenizer when its saved vocab_size is set (export).
    attention: the running config's model.attention (a checkpoint trained with splash on a TPU evaluates with this
    run's choice, e.g. xla on a CPU); the saved config's is not used."""
    workdir = os.fspath(workdir)
    meta = ckpt_lib.load_meta(workdir)
    saved = meta.get("config") or {}
    if "model" not in saved:
        raise ValueError(f"{workdir}: the checkpoint's saved config has no 'model' section; expected a checkpoint "
                         f"written by pal_jax training (stage1 or stage2)")
    tok = checkpoint_tokenizer(workdir, saved, tokenizer_path)
    if tok is None and (need_tokenizer or saved["model"].get("vocab_size", 0) == 0):
        raise FileNotFoundError(f"no tokenizer for {workdir}: expected {workdir}/tokenizer/tokenizer.json or a "
                                f"tokenizer path (--config.tokenizer.path)")
    cfg = model_config(saved["model"], tok.vocab_size if tok is not None else 1, attention)
    spec = ModelSpec(cfg, mesh, mesh_lib.axis_rules(saved) if rules is None else rules)
    params = init_from.checkpoint_params(workdir, spec, saved)
    return Restored(spec, params, tok, int(meta["step"]), meta)
