"""Select then Generate.

1. Select: for each record, score every persona sentence (as the select target `k.<sentence>`) and
   `No personal description.` as continuations of the select prompt with the candidate scorer; take the best.
2. Generate: decode the reply from the generate prompt that highlights the selected persona (or none).

Only the persona and the history are read: `Predictor.predict` strips every record to (persona, history) before
anything else, so a record's gold response, label or candidates never reach a prediction.

Prompt formats (`predict.prompt_format`, resolved by `resolve_formats`): "plain" is the text format Stage 1 trains
on (data/templates.py), right for pal_jax checkpoints; "chat" wraps the same prompts as a conversation in the
base model's own chat template (data/chat_format.py: persona in the system message, the history as user/assistant
turns), rendered by transformers' apply_chat_template over the model's tokenizer (`chat_prompts`), and stops
decoding at the template's end-of-turn token (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`) or any of the model's
eos ids, right for an instruct model that was not fine-tuned here. "auto" picks chat for a base model whose chat
template renders and plain for everything else (a template that fails to render, or cannot be cut into messages,
falls back to plain with a warning naming the checkpoint). The Select step has its own format
(`predict.select_format`, "auto" = SELECT_AUTO[prompt format]); see SELECT_AUTO for the measurement behind it.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Iterable, Sequence

import jax
import numpy as np
from etils import epath

from pal_jax.core import atomic
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.data import chat_format, convai2, corpus, pipeline, templates
from pal_jax.data.records import load_records, write_predictions
from pal_jax.inference import decode as sampling
from pal_jax.inference import scoring, selection
from pal_jax.model import tokenizer as tok_lib
from pal_jax.model.spec import ModelSpec, model_config
from pal_jax.weights import init_from, tokenizers
from pal_jax.weights.restore import restore

PROMPT_FORMATS = ("auto", "plain", "chat")
FORMAT_MODULES = {"plain": templates, "chat": chat_format}
# The Select step's format when predict.select_format = "auto", by the resolved generate format. Chosen by the
# base SmolLM2-135M-Instruct's persona selection accuracy on the first 100 ConvAI2 dev-part turns (overlap labels,
# 46% "none"; select_by=sum): chat 0.36, plain 0.09 (docs/real_run.md, "Prompt formats").
SELECT_AUTO = {"plain": "plain", "chat": "chat"}


@dataclasses.dataclass(frozen=True)
class Record:
    """What prediction may see: the persona and the dialogue history (oldest first, ending with the partner)."""
    persona: tuple[str, ...]
    history: tuple[str, ...]


@dataclasses.dataclass
class Prediction:
    selected: int  # index into persona, -1 = none
    selected_text: str
    select_score: float
    candidate_scores: list[float]  # one per persona sentence, then "none", under the Predictor's select_by
    response: str
    features: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # selection.features, every rule


CAND_BUCKETS = (8, 16, 24, 32, 48, 64, 128, 256)  # candidate lengths (tokens) the scorer compiles for


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


class Predictor:
    """Holds jitted scorer/decoder over a model's params; batches records into fixed shapes (few compilations)."""

    def __init__(self, model_state, params, tokenizer, *, max_len: int, buckets: Sequence[int], batch_size: int,
                 sampling_cfg: sampling.SamplingConfig, select_by: str = "sum", seed: int = 0,
                 prompt_format: str = "plain", select_format: str | None = None, none_bias: float = 0.0,
                 chat: chat_format.ChatPrompts | None = None):
        """prompt_format: "plain" | "chat" (resolved; see resolve_formats) for the generate and persona-free
        prompts; select_format: the Select step's ("plain" | "chat"; None = prompt_format); select_by: a
        selection.RULES rule; none_bias: the "calibrated" rule's bias on "none" (see calibrate); chat: the "chat"
        format's prompts (chat_prompts: the model's template; None = ChatML, chat_format.CHATML)."""
        if select_by not in selection.RULES:
            raise ValueError(f"predict.select_by = {select_by!r}: expected one of {selection.RULES}")
        select_format = select_format or prompt_format
        for key, fmt in (("prompt_format", prompt_format), ("select_format", select_format)):
            if fmt not in FORMAT_MODULES:
                raise ValueError(f"predict.{key} = {fmt!r}: expected one of {tuple(FORMAT_MODULES)} (resolved)")
        self.ms, self.params, self.tok = model_state, params, tokenizer
        self.max_len, self.buckets, self.batch_size = max_len, tuple(buckets), batch_size
        self.sampling_cfg, self.select_by, self.none_bias = sampling_cfg, select_by, float(none_bias)
        self.calibration: dict | None = None  # how none_bias was fitted (calibrate)
        self.prompt_format, self.select_format = prompt_format, select_format
        self.chat = chat if chat is not None else chat_format.CHATML
        formats = {**FORMAT_MODULES, "chat": self.chat}
        self._gen_tpl, self._sel_tpl = formats[prompt_format], formats[select_format]
        self.end_id = self._end_id(prompt_format)  # ends a reply (decoding stops there; appended to scored replies)
        self.select_end_id = self._end_id(select_format)
        self.stop_ids = (tokenizer.eos_id,) if prompt_format == "plain" else tuple(sorted(
            {tokenizer.eos_id, self.end_id, *tokenizer.stop_ids}
            | {i for i in (_token_id(tokenizer, "<|endoftext|>"),) if i is not None}))
        self.rng = jax.random.key(seed)
        self.cuts: collections.Counter = collections.Counter()  # prompt fitting's cuts (_prompt_ids), per predict()
        # generate prompts are padded to at least this many tokens (then bucketed): set to the longest generate prompt
        # a fixed set of records can have (pal_jax/training/samples.py), so every call decodes in one shape whatever the Select
        # step picked; 0 = each batch's own longest prompt
        self.min_prompt_len = 0
        div = mesh_lib.batch_divisor(model_state.mesh)
        if batch_size % div:
            raise ValueError(f"batch_size {batch_size}: expected a multiple of the mesh's data*fsdp = {div}")

    def _end_id(self, fmt: str) -> int:
        if fmt == "plain":
            return self.tok.eos_id
        i = _token_id(self.tok, self.chat.end_text)
        if i is None:
            raise ValueError(f"prompt format 'chat': the tokenizer ({self.tok.source or 'given'}) has no single "
                             f"{self.chat.end_text} token (the end of a turn in {self.chat.source}); expected the "
                             f"tokenizer of the model whose chat template it is, or predict.prompt_format='plain'")
        return i

    # -- encoding ---------------------------------------------------------------------------------------------
    def _prompt_ids(self, parts: templates.PromptParts, budget: int) -> list[int]:
        ids, cut = pipeline.encode_prompt_cuts(parts, self.tok, budget)
        self.cuts["prompts"] += 1
        self.cuts["older_history"] += cut.history_lines > 0
        self.cuts["last_message"] += cut.last_line_tokens > 0
        self.cuts["head"] += cut.head_tokens > 0
        return ids

    def cuts_text(self) -> str:
        """What prompt fitting cut since the counts were last reset (self.cuts = collections.Counter())."""
        c = self.cuts
        return (f"{c['prompts']} prompts (select and generate), cut to fit: {c['older_history']} lost older "
                f"history lines, {c['last_message']} the start of the user's last message, {c['head']} the start "
                f"of the persona block")

    def _put(self, *arrays):
        """Batch arrays -> global arrays split by rows; each process passes only its rows (multi-host)."""
        mesh = self.ms.mesh
        local = mesh_lib.process_rows(mesh, len(arrays[0]))
        out = mesh_lib.global_batch({str(i): a[local] for i, a in enumerate(arrays)}, mesh, len(arrays[0]))
        return [out[str(i)] for i in range(len(arrays))]

    def _batches(self, lengths: Sequence[int]) -> Iterable[tuple[list[int], int]]:
        """Batches of row indices, shortest prompts first, each with its own prompt bucket: (rows padded to
        batch_size with a repeat of a real row, number of real rows). Sorting by length keeps each batch's
        padding small; the bucket set bounds the number of compiled shapes."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        for lo in range(0, len(order), self.batch_size):
            rows = order[lo:lo + self.batch_size]
            yield rows + [rows[0]] * (self.batch_size - len(rows)), len(rows)

    # -- select -----------------------------------------------------------------------------------------------
    def candidate_texts(self, persona: Sequence[str]) -> list[str]:
        return [templates.select_target(list(persona), k) for k in range(len(persona))] + [templates.NONE_PERSONA]

    def token_scores(self, prompts: list[list[int]], candidates: list[list[list[int]]]) -> list[list[np.ndarray]]:
        """Per prompt, per candidate: the token log-probs of the candidate id list after the prompt (its real
        tokens; a candidate longer than the largest CAND_BUCKETS length is cut there).

        Each batch pads its candidates to the bucket (CAND_BUCKETS) of its own longest one, so one long candidate
        (ConvAI2's 20 have up to ~35 tokens, 14 on average) does not pad every batch."""
        kmax = max(len(c) for c in candidates)
        out: list[list[np.ndarray] | None] = [None] * len(prompts)
        for rows, real in self._batches([len(p) for p in prompts]):
            p_len = _bucket(max(len(prompts[i]) for i in rows), self.buckets)
            c_len = _bucket(max(len(x) for i in rows for x in candidates[i]), CAND_BUCKETS)
            toks, mask = sampling.left_pad([prompts[i] for i in rows], p_len, self.tok.pad_id)
            ct = np.full((self.batch_size, kmax, c_len), self.tok.pad_id, np.int32)
            cm = np.zeros((self.batch_size, kmax, c_len), bool)
            for r, i in enumerate(rows):
                for k, ids in enumerate(candidates[i]):
                    ids = ids[:c_len]
                    ct[r, k, :len(ids)] = ids
                    cm[r, k, :len(ids)] = True
            lp = scoring.candidate_token_logprobs_jit(self.ms.graphdef, self.params,
                                                       *self._put(toks, mask, ct, cm))
            lp = mesh_lib.to_host(lp)  # every process gets every row
            for r, i in enumerate(rows[:real]):
                out[i] = [lp[r, k, :min(len(ids), c_len)] for k, ids in enumerate(candidates[i])]
        return out

    def score(self, prompts: list[list[int]], candidates: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """Summed and mean log-probs [N, Kmax] (padded candidates get -inf) of candidate id lists per prompt."""
        n, kmax = len(prompts), max(len(c) for c in candidates)
        sums = np.full((n, kmax), -np.inf, np.float32)
        means = np.full((n, kmax), -np.inf, np.float32)
        for i, lps in enumerate(self.token_scores(prompts, candidates)):
            for k, x in enumerate(lps):
                sums[i, k], means[i, k] = x.sum(), x.sum() / max(len(x), 1)
        return sums, means

    def select_prompt(self, persona, history) -> templates.PromptParts:
        return self._sel_tpl.select_prompt(list(persona), list(history))

    def select_features(self, records: Sequence[Record]) -> list[dict[str, np.ndarray]]:
        """selection.features (sum, mean, decision per candidate, "none" last) of each record's select candidates."""
        end = [self.select_end_id]
        cands = [[self.tok.encode(t) + end for t in self.candidate_texts(r.persona)] for r in records]
        longest = max(len(x) for c in cands for x in c)
        prompts = [self._prompt_ids(self.select_prompt(r.persona, r.history), self.max_len - longest)
                   for r in records]
        return [selection.features(lps, c) for lps, c in zip(self.token_scores(prompts, cands), cands)]

    def select(self, records: Sequence[Record], feats=None) -> list[tuple[int, float, list[float]]]:
        """(persona index or -1, its score, every candidate's score) per record under self.select_by."""
        out = []
        for f in feats if feats is not None else self.select_features(records):
            sc = selection.rule_scores(f, self.select_by, self.none_bias)
            best = selection.pick(sc)
            out.append((best, float(sc[best]), [float(x) for x in sc]))
        return out

    # -- generate ---------------------------------------------------------------------------------------------
    def generate_from_prompts(self, prompts: list[list[int]]) -> list[str]:
        texts: list[str | None] = [None] * len(prompts)
        for rows, real in self._batches([len(p) for p in prompts]):
            p_len = _bucket(max(self.min_prompt_len, *(len(prompts[i]) for i in rows)), self.buckets)
            toks, mask = sampling.left_pad([prompts[i] for i in rows], p_len, self.tok.pad_id)
            self.rng, key = jax.random.split(self.rng)
            stop = self.stop_ids if len(self.stop_ids) > 1 else self.stop_ids[0]
            out = sampling.generate_jit(self.ms.graphdef, self.params, *self._put(toks, mask), key,
                                        cfg=self.sampling_cfg, eos_id=stop, pad_id=self.tok.pad_id)
            out = mesh_lib.to_host(out)
            for r, i in enumerate(rows[:real]):
                ids = [int(t) for t in out[r]]
                cut = [ids.index(s) for s in self.stop_ids if s in ids]
                if cut:
                    ids = ids[:min(cut)]
                texts[i] = self.tok.decode(ids).strip()
        return texts

    def generate_prompts(self, records: Sequence[Record], selected: Sequence[int], budget: int) -> list[list[int]]:
        """Generate-prompt ids highlighting each record's selected persona (-1: none), at most `budget` tokens."""
        out = []
        for r, s in zip(records, selected):
            persona = list(r.persona)
            chosen = persona[s] if s >= 0 else None
            out.append(self._prompt_ids(self._gen_tpl.generate_prompt(persona, list(r.history), chosen), budget))
        return out

    @property
    def prompt_budget(self) -> int:
        """Tokens a prompt to decode from may take: the rest of max_len is left to max_new_tokens."""
        return self.max_len - self.sampling_cfg.max_new_tokens

    def generate(self, records: Sequence[Record], selected: Sequence[int]) -> list[str]:
        return self.generate_from_prompts(self.generate_prompts(records, selected, self.prompt_budget))

    def persona_free(self, records: Sequence[Record]) -> list[str]:
        return self.generate_from_prompts(
            [self._prompt_ids(self._gen_tpl.persona_free_prompt(list(r.history)), self.prompt_budget)
             for r in records])

    def predict(self, records) -> list[Prediction]:
        """records: anything with .persona and .history (e.g. data.convai2.PromptRecord); nothing else is read."""
        records = [Record(tuple(r.persona), tuple(r.history)) for r in records]
        self.cuts = collections.Counter()
        t0 = time.time()
        feats = self.select_features(records)
        sel = self.select(records, feats)
        t1 = time.time()
        responses = self.generate(records, [s[0] for s in sel])
        t2 = time.time()
        logging.info("predict: %d records, select %.1fs, generate %.1fs; %s", len(records), t1 - t0, t2 - t1,
                     self.cuts_text())
        if self.cuts["last_message"]:
            logging.warning("predict: %d prompts kept only the end of the user's last message (longer than the "
                            "prompt budget of %d tokens)", self.cuts["last_message"], self.max_len)
        return [Prediction(selected=s, selected_text=(r.persona[s] if s >= 0 else templates.NONE_PERSONA),
                           select_score=score, candidate_scores=cs, response=resp,
                           features={k: [float(x) for x in v] for k, v in f.items()})
                for r, (s, score, cs), resp, f in zip(records, sel, responses, feats)]


def _token_id(tok, text: str) -> int | None:
    """The id of `text` when the tokenizer has it as one token, else None."""
    i = tok.tok.token_to_id(text)
    return None if i is None else int(i)


# -- modes ------------------------------------------------------------------------------------------------------

def sampling_config(config) -> sampling.SamplingConfig:
    p = config.predict
    return sampling.SamplingConfig(method=p.method, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                   beam_width=p.beam_width, length_penalty=p.length_penalty,
                                   max_new_tokens=p.max_new_tokens)


def load_predictor(config, ckpt_path: str, devices=None) -> Predictor:
    """A Predictor over the latest checkpoint in ckpt_path (a workdir), on this machine's mesh.

    The model shape comes from the checkpoint's own saved config; the tokenizer from config.tokenizer.path, else
    the checkpoint's workdir, else the tokenizer path the checkpoint was trained with.
    """
    if not ckpt_lib.Checkpointer.exists(ckpt_path):
        spec = ckpt_path if _is_pretrained(ckpt_path) else config.init_from
        if spec and _is_pretrained(spec):  # a base model without fine-tuning
            return _pretrained_predictor(config, spec, ckpt_path, devices)
    r = restore(ckpt_path, mesh_lib.make_mesh(config.mesh, devices), mesh_lib.axis_rules(config),
                config.tokenizer.path, attention=config.model.attention)
    logging.info("predict: %s step %d (%s)", ckpt_path, r.step, r.meta.get("task", "?"))
    predictor = _predictor(config, r.spec, r.params, r.tokenizer, resolve_chat(config, ckpt_path, False, r.tokenizer))
    return calibrate(config, predictor, ckpt_path, r.step, calibration_data(config, r.meta["config"]))


CALIBRATION_FILE = "select_calibration.json"  # in a checkpoint's workdir: the calibrated rule's fitted bias


def calibration_data(config, saved: dict | None):
    """The corpus whose dev split the calibrated rule fits on: the one the checkpoint was trained on (its saved
    config's data section) when that is still readable here, else the configured one (config.data). So predict or
    chat on a checkpoint, run with the default data settings, does not fit the bias on another corpus."""
    import ml_collections
    data = (saved or {}).get("data")
    if data and (data.get("source") == "synthetic" or (data.get("path") and epath.Path(data["path"]).exists())):
        return ml_collections.ConfigDict(data)
    return config.data


def calibrate(config, predictor: Predictor, workdir: str | None, step, data=None) -> Predictor:
    """With predict.select_by = "calibrated": set the predictor's "none" bias (selection.calibrate_none_bias) and
    return it. The bias is read from WORKDIR/select_calibration.json when that was fitted for the same checkpoint
    step, select format and dev turns; otherwise it is fitted now on the first predict.calibration_turns (0 = all)
    turns of the dev split of `data` (calibration_data; default config.data) and written there (process 0,
    atomically). workdir None (a base model): fitted and kept in memory only. Other rules: the predictor as it
    is."""
    if predictor.select_by != "calibrated":
        return predictor
    data = config.data if data is None else data
    if not data.dev_fraction:
        raise ValueError("config.predict.select_by = 'calibrated' fits its bias on the dev split, but "
                         "data.dev_fraction = 0; expected a dev split, or another predict.select_by")
    turns = config.predict.get("calibration_turns", 0)
    key = {"step": step, "select_format": predictor.select_format, "data": corpus.origin(data),
           "split_seed": data.split_seed, "dev_fraction": data.dev_fraction, "turns": turns}
    path = epath.Path(workdir) / CALIBRATION_FILE if workdir else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            predictor.none_bias, predictor.calibration = float(saved["none_bias"]), saved
            logging.info("predict: calibrated 'none' bias %+.3f from %s", predictor.none_bias, path)
            return predictor
    recs = [r for r in convai2.records_from_dialogues(corpus.load_corpus(data)["dev"])
            if r.persona_label is not None]
    recs = recs[:turns] if turns else recs
    if not recs:
        raise ValueError(f"config.predict.select_by = 'calibrated': no labelled turns in the dev split of "
                         f"{key['data']}; expected persona labels (data.labeler) on dev turns")
    t0 = time.time()
    feats = predictor.select_features([Record(tuple(r.persona), tuple(r.history)) for r in recs])
    bias, acc, acc0 = selection.calibrate_none_bias([f["sum"] for f in feats], [r.persona_label for r in recs])
    predictor.none_bias = bias
    predictor.calibration = {"key": key, "none_bias": bias, "dev_turns": len(recs), "dev_accuracy": acc,
                             "dev_accuracy_sum": acc0, "rule": "sum + none_bias"}
    logging.info("predict: calibrated 'none' bias %+.3f on %d dev turns (dev selection accuracy %.3f; %.3f with "
                 "no bias) in %.0fs", bias, len(recs), acc, acc0, time.time() - t0)
    if path is not None and mesh_lib.is_primary():
        atomic.write_json(path, predictor.calibration)
    return predictor


def chat_prompts(template: str | None, tok, source: str) -> chat_format.ChatPrompts:
    """The chat format of `template` (the model's chat template text) rendered through transformers:
    apply_chat_template(messages, tokenize=False, add_generation_prompt=...) of the model's tokenizer `tok` with
    that template (tok_lib.hf_tokenizer; nothing is downloaded, no remote code). TemplateError naming `source`
    when there is no template, it does not render or cannot be cut into messages (chat_format.ChatPrompts), or its
    end-of-turn text is not one token of `tok`."""
    if not template:
        raise chat_format.TemplateError(f"{source}: no chat template (tokenizer.chat_template, or chat_template in "
                                        f"tokenizer_config.json); expected one for predict.prompt_format='chat', or "
                                        f"use predict.prompt_format='plain'")
    hf = tok_lib.hf_tokenizer(tok, template)
    chat = chat_format.ChatPrompts(
        lambda messages, gen: hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen),
        f"{source}'s chat template")
    if _token_id(tok, chat.end_text) is None:
        raise chat_format.TemplateError(f"{source}: the chat template ends a turn with {chat.end_text!r}, which is "
                                        f"not one token of the tokenizer ({tok.source or 'given'}); expected the "
                                        f"end-of-turn token, where decoding stops")
    return chat


def resolve_formats(config, spec: str, base: bool, tokenizer=None) -> tuple[str, str]:
    """(generate format, select format), each "plain" or "chat", for the model at `spec`: resolve_chat without
    its chat prompts."""
    return resolve_chat(config, spec, base, tokenizer)[:2]


def resolve_chat(config, spec: str, base: bool, tokenizer=None) -> tuple[str, str, chat_format.ChatPrompts | None]:
    """(generate format, select format, chat prompts or None) for the model at `spec` (an init_from value or a
    pal_jax workdir); base: `spec` is pretrained weights without fine-tuning here; tokenizer: the model's, to
    render its chat template through transformers (chat_prompts); None: only a ChatML template is recognised
    (chat_format.is_chatml) and rendered as chat_format.CHATML.

    predict.prompt_format "auto": "chat" for a base model whose chat template renders, else "plain" (Stage 1
    trains on the plain templates, so a pal_jax checkpoint reads them; a template that fails falls back to plain
    with a warning naming `spec`); "chat" requires a template that renders (the checkpoint's own, or that of the
    weights it started from) and stops with an error otherwise; "plain" is plain. predict.select_format: "auto" =
    SELECT_AUTO[the generate format], or "plain" / "chat"."""
    p = config.predict
    want = p.get("prompt_format", "plain")
    if want not in PROMPT_FORMATS:
        raise ValueError(f"config.predict.prompt_format = {want!r}: expected one of {PROMPT_FORMATS}")
    sel = p.get("select_format", "auto")
    if sel not in PROMPT_FORMATS:
        raise ValueError(f"config.predict.select_format = {sel!r}: expected one of {PROMPT_FORMATS}")
    template = None
    if want == "chat" or sel == "chat" or (want == "auto" and base):
        template = init_from.chat_template(spec)

    def chat_or_error(key: str) -> chat_format.ChatPrompts:
        if tokenizer is None:
            chat_format.check_chatml(template, f"predict.{key}='chat' for {spec}")
            return chat_format.CHATML
        return chat_prompts(template, tokenizer, f"predict.{key}='chat' for {spec}")

    fmt, chat = "plain", None
    if want == "chat":
        fmt, chat = "chat", chat_or_error("prompt_format")
    elif want == "auto" and base and template:
        try:
            chat = chat_or_error("prompt_format")
            fmt = "chat"
        except chat_format.TemplateError as e:
            logging.warning("predict: %s: its chat template cannot be used (%s); prompt_format auto -> plain", spec, e)
    if sel == "auto":
        sel = SELECT_AUTO[fmt]
    elif sel == "chat" and chat is None:
        chat = chat_or_error("select_format")
    logging.info("predict: %s: prompt format %s, select format %s%s", spec, fmt, sel,
                 f" ({chat.source}, turns end with {chat.end_text})" if chat is not None else "")
    return fmt, sel, chat


def _predictor(config, ms, params, tok, formats: tuple = ("plain", "plain")) -> Predictor:
    """config.predict's Predictor; the batch is rounded up to a multiple of the mesh's data*fsdp. formats:
    resolve_chat's (generate format, select format[, chat prompts])."""
    div = mesh_lib.batch_divisor(ms.mesh)
    batch = -(-config.predict.batch_size // div) * div
    return Predictor(ms, params, tok, max_len=config.data.max_len, buckets=tuple(config.data.buckets),
                     batch_size=batch, sampling_cfg=sampling_config(config), select_by=config.predict.select_by,
                     seed=config.seed, prompt_format=formats[0], select_format=formats[1],
                     chat=formats[2] if len(formats) > 2 else None)


def _is_pretrained(spec: str) -> bool:
    try:
        return init_from.kind(spec) in ("hf", "gguf")
    except FileNotFoundError:
        return False


def _pretrained_predictor(config, spec: str, workdir: str, devices=None) -> Predictor:
    """A Predictor over pretrained weights (HF dir, .gguf, smollm2_gguf) in config.model's shape: the base model."""
    tok = tokenizers.base_model_tokenizer(config, spec, workdir)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    ms = ModelSpec(model_config(config.model, tok.vocab_size), mesh, mesh_lib.axis_rules(config))
    params = init_from.load(spec, ms)
    logging.info("predict: base model %s (no fine-tuning)", spec)
    return calibrate(config, _predictor(config, ms, params, tok, resolve_chat(config, spec, True, tok)), None, spec)


def run_predict(config, workdir: str) -> dict:
    records, origin = load_records(config)  # first: an input error stops the run before the model loads
    predictor = load_predictor(config, workdir)
    preds = predictor.predict(records)
    out = config.predict.output or os.path.join(workdir, "predictions.jsonl")
    if not mesh_lib.is_primary():  # multi-host: every process predicts, process 0 writes
        return {"records": len(preds), "input": origin, "predictions": out}
    write_predictions(out, records, preds)
    for r, p in list(zip(records, preds))[:5]:
        print(f"user: {r.history[-1]}\n  persona: {p.selected_text}  (score {p.select_score:.2f})\n  bot: {p.response}")
    return {"records": len(preds), "input": origin, "predictions": out, "prompts": predictor.cuts_text()}


def run_chat(config, workdir: str, lines=None) -> dict:
    """Interactive: a persona file, then typed turns; the selected persona is shown beside each reply."""
    import sys
    try:
        with open(config.predict.persona_file, encoding="utf-8") as f:
            persona = tuple(x.strip() for x in f if x.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise convai2.DataError(f"config.predict.persona_file {config.predict.persona_file}: cannot read it ({e}); "
                                f"expected a UTF-8 text file with one persona sentence a line") from None
    if not persona:
        raise convai2.DataError(f"{config.predict.persona_file}: no persona sentences; expected one sentence a line")
    predictor = load_predictor(config, workdir)
    print("persona:\n" + "\n".join(f"  {i + 1}. {s}" for i, s in enumerate(persona)))
    print("type a message (empty line or Ctrl-D to stop)")
    history: list[str] = []
    stream = lines if lines is not None else sys.stdin
    turns = 0
    for line in stream:
        line = line.strip()
        if not line:
            break
        history.append(line)
        p = predictor.predict([Record(persona, tuple(history))])[0]
        history.append(p.response)
        turns += 1
        print(f"bot: {p.response}    [persona: {p.selected_text}]", flush=True)
    return {"turns": turns}
