"""Selection rules for the Select step: how candidate log-probs become a choice (pure numpy; no jax).

The Select step scores, after the select prompt, every persona sentence as its target `k.<sentence>` and the fixed
`No personal description.`, each followed by the end token. A record's candidates are the n persona targets, then
"none" (index n). Each rule turns the candidates' token log-probs into one score per candidate; the pick is the
argmax (the first candidate on ties), so `pairs.py` can take "the strongest other candidate" under any rule.

- `sum`: the summed log-prob of the whole target. The target's log-probability, but the long `k.<sentence>`
  targets pay for every sentence token and lose to the short fixed "none" (docs/results.md: the tiny Stage 1
  ranks the labelled sentence first among the sentences on most persona turns, yet picks "none" on every turn).
- `mean`: the mean token log-prob (length-normalised).
- `decision`: the log-prob of each candidate's *decision tokens*: its tokens up to and including the first one
  that tells it apart from every other candidate of the record (the persona index `1`, `2`, ... or `No`). What
  follows is then a copy of a sentence the prompt shows, so it says little about the choice.
- `lse`: "none" against all persona sentences at once: "none" wins when its summed log-prob beats the
  log-sum-exp of the sentences' (P(none) > P(one of these sentences)); otherwise the best sentence by summed
  log-prob. Reported as the sums with "none" shifted by max - logsumexp of the sentences, which gives that
  decision.
- `marginal`: the same two steps, with "none" against the persona sentences decided on the decision tokens
  alone: P(the reply starts as "none") against P(it starts with some persona index), the class probabilities
  with every continuation summed out; then the best sentence by summed log-prob. Unlike `lse` it does not make
  the sentences pay for the probability the model puts on continuations other than their exact words.
- `calibrated`: `sum` plus a constant bias on "none", chosen to maximise selection accuracy on the dev split
  (`calibrate_none_bias`) and saved beside the checkpoint (predict.CALIBRATION_FILE).

docs/method.md has the measurement that chose the default (predict.select_by).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RULES = ("calibrated", "marginal", "lse", "decision", "mean", "sum")


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def decision_lengths(cands: Sequence[Sequence[int]]) -> list[int]:
    """Per candidate: the number of its leading tokens up to and including the first that differs from every
    other candidate (1 + the longest common prefix with any other), at most its length."""
    out = []
    for k, c in enumerate(cands):
        shared = max((_lcp(c, o) for j, o in enumerate(cands) if j != k), default=0)
        out.append(min(shared + 1, len(c)))
    return out


def features(token_lps: Sequence[np.ndarray], cands: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """{"sum", "mean", "decision"} [K] of one record's candidates from their token log-probs (one array per
    candidate, its real tokens only)."""
    lens = decision_lengths(cands)
    lps = [np.asarray(x, np.float64) for x in token_lps]
    return {"sum": np.array([x.sum() for x in lps]),
            "mean": np.array([x.mean() if len(x) else 0.0 for x in lps]),
            "decision": np.array([x[:d].sum() for x, d in zip(lps, lens)])}


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))


def rule_scores(feats: dict[str, np.ndarray], rule: str, none_bias: float = 0.0) -> np.ndarray:
    """One score per candidate (the last is "none") under `rule`; the pick is their argmax."""
    if rule in ("sum", "mean", "decision"):
        return np.array(feats[rule], np.float64)
    s = np.array(feats["sum"], np.float64)
    if rule in ("lse", "marginal"):
        if len(s) > 1:  # "none" wins iff its class score beats the sentences' log-sum-exp (ties: a sentence)
            cls = s if rule == "lse" else np.asarray(feats["decision"], np.float64)
            s[-1] = float(np.max(s[:-1])) + cls[-1] - _logsumexp(cls[:-1])
        return s
    if rule == "calibrated":
        s[-1] += none_bias
        return s
    raise ValueError(f"predict.select_by = {rule!r}: expected one of {RULES}")


def pick(scores: np.ndarray) -> int:
    """The persona index chosen by rule scores (argmax, first on ties); -1 when "none" (the last) wins."""
    best = int(np.argmax(scores))
    return -1 if best == len(scores) - 1 else best


def calibrate_none_bias(sums: Sequence[np.ndarray], labels: Sequence[int]) -> tuple[float, float, float]:
    """(bias, dev accuracy with it, dev accuracy without it): the constant added to the "none" summed log-prob
    that maximises selection accuracy over labelled turns (sums[i]: a record's candidate sums, "none" last;
    labels[i]: -1 = none, else the persona index). Of the best biases, the one nearest 0; it lies midway between
    two turns' thresholds, so a small change in the scores does not flip a dev turn."""
    if len(sums) != len(labels) or not len(labels):
        raise ValueError(f"calibrate_none_bias: {len(sums)} score rows and {len(labels)} labels; expected equal, "
                         f"non-zero counts (labelled dev turns)")
    margin, persona_ok, is_none = [], [], []
    for s, y in zip(sums, labels):
        s = np.asarray(s, np.float64)
        best = int(np.argmax(s[:-1])) if len(s) > 1 else -1
        margin.append(float(s[best] - s[-1]) if best >= 0 else -np.inf)  # "none" wins iff bias > margin
        persona_ok.append(y >= 0 and best == y)
        is_none.append(y == -1)
    m = np.array(margin)
    ok, none = np.array(persona_ok), np.array(is_none)
    finite = np.unique(m[np.isfinite(m)])
    cands = [0.0] + ([finite[0] - 1.0, finite[-1] + 1.0] if len(finite) else [])
    cands += list((finite[1:] + finite[:-1]) / 2)

    def acc(b):
        picks_none = b > m
        return float(np.mean(np.where(picks_none, none, ok)))

    scored = sorted(((acc(b), -abs(b), b) for b in cands), reverse=True)
    best_acc, _, bias = scored[0]
    return float(bias), best_acc, acc(0.0)
