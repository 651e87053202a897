"""The `export` mode: a pal_jax checkpoint -> a Hugging Face model directory (pal_jax/weights/hf.py's
export_hf_dir) with its tokenizer. A LoRA checkpoint's adapters are merged into its base first (W + alpha/r A B).
Export is a host operation: the checkpoint is restored onto one CPU device."""
from __future__ import annotations

import logging
import os

import jax
import numpy as np

from pal_jax.core import mesh as mesh_lib
from pal_jax.weights import hf
from pal_jax.weights.restore import restore


def export_checkpoint(workdir, out_dir, tokenizer_path: str = "") -> dict:
    """Export the latest checkpoint of a pal_jax run (stage1/stage2 workdir) as an HF model dir with its tokenizer.

    Returns a summary dict (output_dir, step, family, vocab_size, params, tokenizer)."""
    cpu_mesh = mesh_lib.make_mesh(dict.fromkeys(mesh_lib.AXES, 1), jax.local_devices(backend="cpu")[:1])
    r = restore(workdir, cpu_mesh, None, tokenizer_path, need_tokenizer=False)
    if r.tokenizer is None:
        logging.warning("export: no tokenizer found for %s; exporting the model without tokenizer files", workdir)
    cfg = r.spec.cfg
    out = hf.export_hf_dir(r.params, cfg, out_dir, tokenizer=r.tokenizer)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(r.params))
    return {"output_dir": out, "step": r.step, "family": cfg.family, "vocab_size": cfg.vocab_size, "params": n,
            "tokenizer": r.tokenizer.source if r.tokenizer is not None else "none"}


def run_export(config, workdir: str) -> dict:
    """The `export` mode: WORKDIR's latest checkpoint -> config.export.output_dir (empty: WORKDIR/hf)."""
    out = config.export.output_dir or os.path.join(workdir, "hf")
    return export_checkpoint(workdir, out, tokenizer_path=config.tokenizer.path)
