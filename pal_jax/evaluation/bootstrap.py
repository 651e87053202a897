"""Paired bootstrap over dialogues for corpus metrics (pure numpy/scipy; no jax).

A metric is a `Stat`: one row of sums per turn and a function of their column sums. A mean is rows (value, 1)
and value / count; corpus BLEU is (clipped matches, n-gram totals, lengths) with BLEU's formula; perplexity is
(NLL, tokens); Dist-n and Entropy-n are n-gram count rows (sparse) with distinct / total and the entropy. The
point estimate is the function of the plain column sums, the same number the corpus metric gives.

A resample draws dialogues (not turns) with replacement, so the turns of one dialogue, which are not independent,
move together; a turn's weight is how often its dialogue was drawn. The same draws score every checkpoint, so a
difference between two checkpoints is paired. Interval: the 2.5 and 97.5 percentiles of the resampled values
(or differences); for Dist-n and Entropy-n shifted so that their median is the point estimate (see `interval`).
A difference whose interval contains 0 is "not significant".
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from scipy import sparse

N_RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


@dataclasses.dataclass
class Stat:
    """rows: [T, k] per-turn sums (dense, or scipy sparse for n-gram counts); fn: column sums [k] -> value;
    recentre: a statistic of the pooled corpus that resampling with replacement biases (Dist-n, Entropy-n), whose
    interval is re-centred on the estimate (see `interval`)."""
    rows: np.ndarray | sparse.spmatrix
    fn: Callable[[np.ndarray], float]
    recentre: bool = False

    def totals(self, weights: np.ndarray) -> np.ndarray:
        """Column sums under turn weights [R, T] -> [R, k] (dense)."""
        out = self.rows.T @ weights.T  # [k, R]; sparse @ dense is dense
        return np.asarray(out).T

    def value(self, mask: np.ndarray | None = None) -> float:
        w = np.ones((1, self.rows.shape[0])) if mask is None else np.asarray(mask, np.float64)[None]
        return float(self.fn(self.totals(w)[0]))

    def resampled(self, weights: np.ndarray, chunk: int = 100) -> np.ndarray:
        out = []
        for lo in range(0, len(weights), chunk):  # sparse n-gram totals are [chunk, V] dense: keep them small
            out += [float(self.fn(t)) for t in self.totals(weights[lo:lo + chunk])]
        return np.array(out)


def ratio(num: int = 0, den: int = 1) -> Callable[[np.ndarray], float]:
    """sums[num] / sums[den] (NaN when the denominator is 0: no turn of that kind was drawn)."""
    return lambda s: float(s[num] / s[den]) if s[den] else float("nan")


def mean_stat(values, where=None) -> Stat:
    """The mean of per-turn values over the turns where `where` is true (all by default)."""
    v = np.asarray(values, np.float64)
    w = np.ones_like(v) if where is None else np.asarray(where, np.float64)
    return Stat(np.stack([np.where(w > 0, v, 0.0), w], 1), ratio())


def dialogue_weights(groups: Sequence, n: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[n, T] turn weights of n resamples of the dialogues (groups[t]: turn t's dialogue id)."""
    ids, turn_group = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n, len(ids)))
    counts = np.zeros((n, len(ids)))
    np.add.at(counts, (np.arange(n)[:, None], draws), 1.0)
    return counts[:, turn_group]


def interval(values: np.ndarray, point: float, recentre: bool = False, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of the resampled values; with recentre, shifted so that their median sits on the
    point estimate.

    Resampling with replacement repeats dialogues, which lowers set statistics of the pooled corpus (Dist-n,
    Entropy-n: a repeated dialogue adds n-grams but no new ones), so their resampled values sit below the
    estimate, and their plain percentile interval can miss it; the shift removes that bias. Means and ratios of
    sums are not biased that way and keep the plain percentile interval."""
    v = values[np.isfinite(values)]
    if not len(v) or not np.isfinite(point):
        return float("nan"), float("nan")
    lo, mid, hi = np.percentile(v, [50 * (1 - level), 50, 50 * (1 + level)])
    shift = point - mid if recentre else 0.0
    return float(lo + shift), float(hi + shift)


def significant(lo: float, hi: float) -> bool:
    """The interval excludes 0."""
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))


def compare(stats: dict[str, dict[str, Stat]], groups: Sequence, pairs: Sequence[tuple[str, str]],
            mask: np.ndarray | None = None, n: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """Points, per-checkpoint intervals and paired differences.

    stats: {checkpoint: {metric: Stat}} over the same turns; groups: each turn's dialogue id; pairs: (a, b) to
    report as b - a; mask: the turns to use (a turn-type split), all by default. Returns {"values": {ckpt: {metric:
    value}}, "intervals": {ckpt: {metric: [lo, hi]}}, "differences": {"b - a": {metric: {delta, lo, hi,
    significant}}}}. A metric missing from a checkpoint is left out of its differences."""
    w = dialogue_weights(groups, n, seed)
    if mask is not None:
        w = w * np.asarray(mask, np.float64)[None]
    values, intervals, draws = {}, {}, {}
    for name, per in stats.items():
        values[name], intervals[name], draws[name] = {}, {}, {}
        for key, st in per.items():
            values[name][key] = st.value(mask)
            draws[name][key] = st.resampled(w)
            intervals[name][key] = list(interval(draws[name][key], values[name][key], st.recentre))
    diffs = {}
    for a, b in pairs:
        d = {}
        for key in values[a]:
            if key not in values[b]:
                continue
            delta = values[b][key] - values[a][key]
            lo, hi = interval(draws[b][key] - draws[a][key], delta, stats[b][key].recentre)
            d[key] = {"delta": delta, "lo": lo, "hi": hi, "significant": significant(lo, hi)}
        diffs[f"{b} - {a}"] = d
    return {"values": values, "intervals": intervals, "differences": diffs}
