"""Samples while training: Select then Generate on a few fixed dev turns at every dev evaluation.

At each evaluation of Stage 1 and Stage 2 training (train.eval_every, and the last step) train.run calls the task's
`sample` hook, a `Sampler`: pal_jax/inference/predictor.py's Predictor over the params being trained (no checkpoint is read)
selects a persona sentence (or none) and decodes the reply for `train.sample_turns` dev turns (0 = off). The turns
are a choice seeded with data.split_seed among the dev split's turns (kept in split order), the same at every
evaluation and in Stage 1 and Stage 2 of one pipeline, so the samples show one set of turns changing. The
prediction reads only each turn's persona and history (Predictor.predict strips the rest); the gold reply and the
labelled persona are carried beside it for comparison only. train.run prints one line per turn, writes the turns
to TensorBoard as text (`dev/samples`) and appends them to WORKDIR/samples.jsonl (pal_jax/core/metrics_writer.py).

Cost: the turns are one batch (sample_turns rounded up to the mesh's data*fsdp) of fixed shapes: the candidate
scorer sees the same prompts and candidates every time, and the generate prompts are padded to the longest one any
selection could give (Predictor.min_prompt_len), so each of the scorer and the decoder compiles once per run.

Selection rule: predict.select_by, except "calibrated", whose bias is fitted on the labelled dev split for a
saved checkpoint (too slow to refit at every evaluation, and it would read the labels of the sampled turns): there
the samples use "marginal", the fit-free rule closest to it on the synthetic corpus (docs/method.md; another
predict.select_by is used as it is). Prompt formats: the plain templates Stage 1 trains on, unless
predict.prompt_format or predict.select_format asks for "chat".
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from pal_jax.core import mesh as mesh_lib
from pal_jax.data import convai2
from pal_jax.inference.predictor import Predictor, Record, resolve_chat, sampling_config
from pal_jax.model import lora as lora_lib

NONE = "none"  # the selected persona when the Select step picks "No personal description."


def pick_turns(records: list, n: int, seed: int) -> list:
    """n of the records, chosen with `seed` and kept in their order (all of them when there are at most n)."""
    if len(records) <= n:
        return list(records)
    idx = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
    return [records[i] for i in sorted(int(i) for i in idx)]


def sample_select_rule(rule: str) -> str:
    """The selection rule the samples use for predict.select_by = rule (module doc)."""
    return "marginal" if rule == "calibrated" else rule


def _formats(config, tokenizer) -> tuple:
    p = config.predict
    if "chat" not in (p.get("prompt_format", "auto"), p.get("select_format", "auto")):
        return "plain", "plain", None  # what predict.resolve_chat gives a pal_jax checkpoint
    return resolve_chat(config, config.init_from, False, tokenizer)


class Sampler:
    """task.sample for train.run: sampler(step, params, frozen) -> one row (a dict) per sampled turn."""

    def __init__(self, config, model_state, tokenizer, dev_dialogues):
        n = int(config.train.sample_turns)
        self.records = pick_turns(convai2.records_from_dialogues(dev_dialogues), n, int(config.data.split_seed))
        self.inputs = [Record(tuple(r.persona), tuple(r.history)) for r in self.records]  # all prediction sees
        self.seed = int(config.seed)
        rule = sample_select_rule(config.predict.select_by)
        div = mesh_lib.batch_divisor(model_state.mesh)
        formats = _formats(config, tokenizer)
        self.predictor = Predictor(model_state, None, tokenizer, max_len=config.data.max_len,
                                   buckets=tuple(config.data.buckets), batch_size=-(-len(self.inputs) // div) * div,
                                   sampling_cfg=sampling_config(config), select_by=rule, seed=self.seed,
                                   prompt_format=formats[0], select_format=formats[1], chat=formats[2])
        p = self.predictor
        p.min_prompt_len = max(len(ids) for r in self.inputs for ids in p.generate_prompts(
            [r] * (len(r.persona) + 1), list(range(len(r.persona))) + [-1], p.prompt_budget))
        logging.info("samples: %d dev turns (%s) at every evaluation, select rule %s%s, prompt formats %s/%s",
                     len(self.inputs), ", ".join(str(r.id) for r in self.records), rule,
                     " (predict.select_by calibrated needs a dev fit)" if rule != config.predict.select_by else "",
                     *formats[:2])

    def __call__(self, step: int, params, frozen=None) -> list[dict[str, Any]]:
        p = self.predictor
        p.params = params if frozen is None else lora_lib.combine(frozen, params)
        p.rng = jax.random.fold_in(jax.random.key(self.seed), step)  # a resumed run samples the same
        try:
            preds = p.predict(self.inputs)
        finally:
            p.params = None  # the train step donates the params: hold no reference to them
        rows = []
        for r, pr in zip(self.records, preds):
            label = r.persona_label
            gold_persona = None if label is None else NONE if label < 0 else r.persona[label]
            rows.append({"id": r.id, "user": r.history[-1] if r.history else "", "selected": pr.selected,
                         "persona": r.persona[pr.selected] if pr.selected >= 0 else NONE, "reply": pr.response,
                         "gold_persona": gold_persona, "gold_reply": r.response})
        return rows


def make_sampler(config, model_state, tokenizer, dev_dialogues) -> Sampler | None:
    """The Sampler for a Stage 1 / Stage 2 run, or None when train.sample_turns is 0 or the dev split is empty."""
    if not int(config.train.get("sample_turns", 0)):
        return None
    if not any(d.turns for d in dev_dialogues or ()):
        logging.info("samples: no dev turns (data.dev_fraction = %s): no samples while training",
                     config.data.dev_fraction)
        return None
    return Sampler(config, model_state, tokenizer, dev_dialogues)


def log_lines(rows: list[dict]) -> list[str]:
    """One line per sampled turn: the selected persona (or none), the reply, and the gold reply."""
    return [f"sample {i + 1}/{len(rows)} [{r['id']}] persona: {r['persona']} | reply: {r['reply']} | "
            f"gold: {r['gold_reply']}" for i, r in enumerate(rows)]


def _cell(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict]) -> str:
    """The sampled turns as a markdown table (TensorBoard's text dashboard renders it)."""
    head = ("| turn | user | selected persona | reply | gold persona | gold reply |\n"
            "| --- | --- | --- | --- | --- | --- |\n")
    return head + "".join(f"| {_cell(r['id'])} | {_cell(r['user'])} | {_cell(r['persona'])} | {_cell(r['reply'])} | "
                          f"{_cell(r['gold_persona'])} | {_cell(r['gold_reply'])} |\n" for r in rows)
