"""NLI classifier for the C-score (Madotto et al. 2019): a BERT / RoBERTa sequence classifier in JAX.

Loads a local Hugging Face directory (config.json + model.safetensors + tokenizer.json) holding a
`BertForSequenceClassification` or `RobertaForSequenceClassification` checkpoint. The weights stay plain
float32 jnp arrays in a nested params dict; `forward` is a pure function jitted once per padded shape.

Architecture (matches transformers' eager implementation):
- embeddings: word + position + token-type, then LayerNorm. RoBERTa position ids start at padding_idx + 1 and
  count only non-pad tokens (pad positions get padding_idx).
- post-LayerNorm encoder layers: self-attention (padding masked out) -> dense -> add & LN -> dense -> GELU (exact
  erf) -> dense -> add & LN.
- head: BERT: pooler tanh(dense(h[CLS])) -> classifier. RoBERTa: out_proj(tanh(dense(h[<s>]))).

API: `NLIModel.from_dir(path)`, `NLIModel.predict(premises, hypotheses)` -> +1 entail / 0 neutral / -1 contradict,
`NLIModel.logits(...)`, `c_score_nli(model, responses, personas)` (Madotto et al.'s C-score) and
`c_scores_nli(model, responses, personas)` (that and PAL's released-code form, with per-response rows).
`load_params(..., prefix="", head=False)` and `encode` (final hidden states) are shared with the sentence encoder
in pal_jax/evaluation/sentence_encoder.py.

The two C-score forms run the NLI model in opposite directions:
- Madotto et al. 2019 (`metrics.c_score`, as this module has always run it): premise = response, hypothesis =
  persona sentence; per response the SUM over persona sentences; mean over responses.
- PAL's released code (`metrics.c_score_max`): premise = persona sentence, hypothesis = response; per response
  the MAX over persona sentences; mean over responses.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pal_jax.evaluation import metrics

__all__ = ["NLIConfig", "load_params", "encode", "forward", "NLIModel", "c_score_nli", "c_scores_nli", "BUCKETS",
           "MAX_LEN"]

MAX_LEN = 256
BUCKETS = (32, 64, 128, 256)
_SUPPORTED = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class NLIConfig:
    model_type: str
    num_layers: int
    num_heads: int
    hidden: int
    eps: float
    pad_id: int

    @classmethod
    def from_json(cls, cfg: dict) -> "NLIConfig":
        mt = cfg.get("model_type")
        if mt not in _SUPPORTED:
            raise ValueError(f"pal_jax/evaluation/nli.py: unsupported model_type {mt!r}; expected one of {_SUPPORTED}")
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"pal_jax/evaluation/nli.py: unsupported hidden_act {act!r}; expected 'gelu'")
        pet = cfg.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"pal_jax/evaluation/nli.py: unsupported position_embedding_type {pet!r}; expected 'absolute'")
        pad = cfg.get("pad_token_id")
        return cls(mt, int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"]), int(cfg["hidden_size"]),
                   float(cfg.get("layer_norm_eps", 1e-12)), int(pad if pad is not None else (1 if mt == "roberta" else 0)))


def load_params(tensors: dict, cfg: NLIConfig, *, prefix: str | None = None, head: bool = True) -> dict:
    """Nested dict of float32 jnp arrays from HF tensor names; a missing tensor -> ValueError naming it.

    prefix: the encoder's tensor-name prefix; None = "<model_type>." as in *ForSequenceClassification checkpoints
    ("" for a bare BertModel such as a sentence-transformers checkpoint). head=False: the encoder only (no
    "head" entry), for `encode`.
    """
    p = cfg.model_type if prefix is None else prefix.rstrip(".")
    dot = p + "." if p else ""

    def get(name):
        if name not in tensors:
            raise ValueError(f"pal_jax/evaluation/nli.py: tensor {name!r} missing from the checkpoint "
                             f"(model_type={cfg.model_type!r})")
        return jnp.asarray(np.asarray(tensors[name], dtype=np.float32))

    def lin(name):
        return {"w": get(name + ".weight").T, "b": get(name + ".bias")}

    def ln(name):
        return {"g": get(name + ".weight"), "b": get(name + ".bias")}

    e = f"{dot}embeddings."
    params = {
        "emb": {"word": get(e + "word_embeddings.weight"), "pos": get(e + "position_embeddings.weight"),
                "type": get(e + "token_type_embeddings.weight"), "ln": ln(e + "LayerNorm")},
        "layers": [],
    }
    for i in range(cfg.num_layers):
        l = f"{dot}encoder.layer.{i}."
        params["layers"].append({
            "q": lin(l + "attention.self.query"), "k": lin(l + "attention.self.key"),
            "v": lin(l + "attention.self.value"), "o": lin(l + "attention.output.dense"),
            "ln1": ln(l + "attention.output.LayerNorm"), "ff1": lin(l + "intermediate.dense"),
            "ff2": lin(l + "output.dense"), "ln2": ln(l + "output.LayerNorm"),
        })
    if head and cfg.model_type == "bert":
        params["head"] = {"dense": lin(f"{dot}pooler.dense"), "out": lin("classifier")}
    elif head:
        params["head"] = {"dense": lin("classifier.dense"), "out": lin("classifier.out_proj")}
    return params


def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["g"] + p["b"]


def _lin(x, p):
    return x @ p["w"] + p["b"]


def encode(params: dict, input_ids, attention_mask, token_type_ids, *, cfg: NLIConfig):
    """Final hidden states [B, T, hidden] for int arrays [B, T]; attention_mask 1 = real token, 0 = padding."""
    B, T = input_ids.shape
    mask = attention_mask.astype(jnp.int32)
    if cfg.model_type == "roberta":
        real = (input_ids != cfg.pad_id).astype(jnp.int32)
        pos = jnp.cumsum(real, axis=1) * real + cfg.pad_id
    else:
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    e = params["emb"]
    x = e["word"][input_ids] + e["pos"][pos] + e["type"][token_type_ids]
    x = _ln(x, e["ln"], cfg.eps)
    H, D = cfg.num_heads, cfg.hidden // cfg.num_heads
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    for lp in params["layers"]:
        def heads(t):
            return t.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        q, k, v = heads(_lin(x, lp["q"])), heads(_lin(x, lp["k"])), heads(_lin(x, lp["v"]))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + bias
        a = jax.nn.softmax(s, axis=-1) @ v
        a = a.transpose(0, 2, 1, 3).reshape(B, T, cfg.hidden)
        x = _ln(x + _lin(a, lp["o"]), lp["ln1"], cfg.eps)
        h = jax.nn.gelu(_lin(x, lp["ff1"]), approximate=False)
        x = _ln(x + _lin(h, lp["ff2"]), lp["ln2"], cfg.eps)
    return x


def forward(params: dict, input_ids, attention_mask, token_type_ids, *, cfg: NLIConfig):
    """Logits [B, num_labels] for int arrays [B, T]; attention_mask 1 = real token, 0 = padding."""
    x = encode(params, input_ids, attention_mask, token_type_ids, cfg=cfg)
    pooled = jnp.tanh(_lin(x[:, 0], params["head"]["dense"]))
    return _lin(pooled, params["head"]["out"])


def _label_values(id2label: dict) -> list[int]:
    """+1/0/-1 per class id from id2label names (substrings 'entail', 'neutral', 'contradict')."""
    if not id2label:
        raise ValueError("pal_jax/evaluation/nli.py: config.json has no id2label; cannot map classes to entail/neutral/contradict")
    out = []
    for i in range(len(id2label)):
        name = str(id2label.get(str(i), id2label.get(i, "")))
        low = name.lower()
        v = 1 if "entail" in low else 0 if "neutral" in low else -1 if "contradict" in low else None
        if v is None:
            raise ValueError(f"pal_jax/evaluation/nli.py: cannot map NLI labels {id2label!r} (label {name!r}) to "
                             "entail/neutral/contradict")
        out.append(v)
    return out


class NLIModel:
    """A BERT/RoBERTa NLI classifier with its tokenizer; see module docstring."""

    def __init__(self, params: dict, cfg: NLIConfig, tokenizer, label_values: Sequence[int], max_len: int = MAX_LEN):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.label_values = list(label_values)
        self.max_len = max_len
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_len)
        self._apply = jax.jit(functools.partial(forward, cfg=cfg))

    @classmethod
    def from_dir(cls, path: str, max_len: int = MAX_LEN) -> "NLIModel":
        import tokenizers
        from safetensors.numpy import load_file

        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if not os.path.exists(os.path.join(path, f)):
                raise ValueError(f"pal_jax/evaluation/nli.py: {f} not found in {path!r}")
        with open(os.path.join(path, "config.json")) as fh:
            raw = json.load(fh)
        cfg = NLIConfig.from_json(raw)
        params = load_params(load_file(os.path.join(path, "model.safetensors")), cfg)
        tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return cls(params, cfg, tok, _label_values(raw.get("id2label") or {}), max_len)

    def _batch(self, encs, rows: int):
        L = max(len(e.ids) for e in encs)
        T = next((b for b in BUCKETS if b >= L), L)
        ids = np.full((rows, T), self.cfg.pad_id, np.int32)
        mask = np.zeros((rows, T), np.int32)
        types = np.zeros((rows, T), np.int32)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n], mask[i, :n] = e.ids, 1
            if self.cfg.model_type == "bert":
                types[i, :n] = e.type_ids
        return ids, mask, types

    def logits(self, premises: Sequence[str], hypotheses: Sequence[str], batch_size: int = 32) -> np.ndarray:
        if len(premises) != len(hypotheses):
            raise ValueError(f"pal_jax/evaluation/nli.py: {len(premises)} premises vs {len(hypotheses)} hypotheses")
        out = []
        for s in range(0, len(premises), batch_size):
            encs = [self.tokenizer.encode(p, h) for p, h in zip(premises[s:s + batch_size], hypotheses[s:s + batch_size])]
            ids, mask, types = self._batch(encs, batch_size)  # rows padded to batch_size: one shape per bucket
            out.append(np.asarray(self._apply(self.params, ids, mask, types))[: len(encs)])
        n = len(self.label_values)
        return np.concatenate(out) if out else np.zeros((0, n), np.float32)

    def predict(self, premises: Sequence[str], hypotheses: Sequence[str], batch_size: int = 32) -> list[int]:
        """Per pair: +1 entailment, 0 neutral, -1 contradiction."""
        lg = self.logits(premises, hypotheses, batch_size)
        return [self.label_values[int(i)] for i in lg.argmax(-1)]


def _check_pairs(responses, personas, fn: str) -> None:
    if isinstance(responses, str) or isinstance(personas, str):
        raise TypeError(f"pal_jax/evaluation/nli.py: {fn} got a str for responses or personas; expected a list of responses "
                        "and one list of persona sentences per response")
    if len(responses) != len(personas):
        raise ValueError(f"pal_jax/evaluation/nli.py: {len(responses)} responses vs {len(personas)} personas")
    for i, ps in enumerate(personas):
        if isinstance(ps, str):
            raise TypeError(f"pal_jax/evaluation/nli.py: {fn} personas[{i}] is a str; expected a list of persona sentences")


def _label_rows(model, responses, personas, batch_size: int, *, persona_premise: bool) -> list[list[int]]:
    """NLI labels, one row per response and one entry per persona sentence, from one batched model pass.

    persona_premise=False: NLI(premise = response, hypothesis = sentence) (Madotto et al.); True: NLI(premise =
    sentence, hypothesis = response) (PAL's released code).
    """
    resp = [r for r, ps in zip(responses, personas) for _ in ps]
    sent = [p for ps in personas for p in ps]
    if not resp:
        flat = []
    elif persona_premise:
        flat = list(model.predict(sent, resp, batch_size))
    else:
        flat = list(model.predict(resp, sent, batch_size))
    if len(flat) != len(resp):
        raise ValueError(f"pal_jax/evaluation/nli.py: the NLI model returned {len(flat)} labels for {len(resp)} pairs; "
                         "expected one label per (premise, hypothesis) pair")
    rows, k = [], 0
    for ps in personas:
        rows.append(flat[k:k + len(ps)])
        k += len(ps)
    return rows


def c_score_nli(model: NLIModel, responses: Sequence[str], personas: Sequence[Sequence[str]],
                batch_size: int = 32) -> float:
    """C-score (Madotto et al.): NLI(premise=response, hypothesis=persona sentence), summed per response, mean
    over responses. One model pass; `c_scores_nli` also gives PAL's form and the per-response rows."""
    _check_pairs(responses, personas, "c_score_nli")
    return metrics.c_score(_label_rows(model, responses, personas, batch_size, persona_premise=False))


def c_scores_nli(model: NLIModel, responses: Sequence[str], personas: Sequence[Sequence[str]],
                 batch_size: int = 32) -> dict:
    """Both C-score forms and their per-response values, from two batched NLI passes (one per direction).

    model: an `NLIModel`, or any object with `predict(premises, hypotheses, batch_size)` -> one +1/0/-1 per pair.
    responses: N strings; personas: N lists of persona sentences (response i is scored against personas[i]).
    Returns {
      "c_score": Madotto et al. 2019 = mean of "c_score_rows" (`metrics.c_score`),
      "c_score_max": PAL's released code = mean of "c_score_max_rows" (`metrics.c_score_max`),
      "c_score_rows": list[float], per response the SUM over its persona sentences of NLI(premise = response,
                      hypothesis = sentence),
      "c_score_max_rows": list[float], per response the MAX over its persona sentences of NLI(premise = sentence,
                          hypothesis = response); 0.0 for a response with no persona sentences,
    }. No responses -> ValueError (from pal_jax/evaluation/metrics.py).
    """
    _check_pairs(responses, personas, "c_scores_nli")
    madotto = _label_rows(model, responses, personas, batch_size, persona_premise=False)
    pal = _label_rows(model, responses, personas, batch_size, persona_premise=True)
    return {
        "c_score": metrics.c_score(madotto),
        "c_score_max": metrics.c_score_max(pal),
        "c_score_rows": metrics.c_score_rows(madotto).tolist(),
        "c_score_max_rows": metrics.c_score_max_rows(pal).tolist(),
    }
